"""The keep at which a big model's pruned submodel has a small model's active parameters.

The paper's comparison (a 9B model pruned to a 3B model's active size) counts the
parameters that run per token, leaving the embeddings and the output head out: those
are a table lookup and one matmul over the vocabulary, the same work whatever the FFN
keeps. Pruning shrinks only the FFN, so the big model at keep r runs
``attention_and_norms + r * ffn`` parameters; this solves that for the small model's
dense count. Counts come from the model folders' safetensors headers (nothing is
loaded) and the bank's shape in config.json. Usage:
    python scripts/matching_keep.py BIG_MODEL_FOLDER SMALL_MODEL_FOLDER
"""

import json
import math
import sys
from pathlib import Path

from ifp_mlx.model.safetensors_header import read_header
from ifp_mlx.select.base import resolve_k

EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def parameter_counts(folder: Path) -> dict:
    """Non-embedding parameters outside the FFN, FFN parameters, and the FFN's width."""
    config = json.loads((folder / "config.json").read_text())
    bank = config["ifp"]["bank"]
    header, _ = read_header(folder / config["ifp"]["weights"])
    outside = sum(
        math.prod(entry["shape"])
        for name, entry in header.items()
        if name != "__metadata__" and name not in EMBEDDING_TENSORS
    )
    ffn = bank["num_layers"] * bank["d_ff"] * 3 * bank["hidden_size"]
    return {"outside_ffn": outside, "ffn": ffn, "d_ff": bank["d_ff"]}


def main() -> None:
    big, small = (parameter_counts(Path(p)) for p in sys.argv[1:3])
    target = small["outside_ffn"] + small["ffn"]
    keep = (target - big["outside_ffn"]) / big["ffn"]
    k = resolve_k(big["d_ff"], keep)
    active = big["outside_ffn"] + big["ffn"] * k / big["d_ff"]
    print(json.dumps({
        "small_active_non_embedding": target,
        "big_dense_non_embedding": big["outside_ffn"] + big["ffn"],
        "keep": round(keep, 4),
        "k": k,
        "big_active_non_embedding_at_k": round(active),
    }, indent=1))


if __name__ == "__main__":
    main()
