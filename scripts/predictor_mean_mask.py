"""One static mask from a predictor: the top-k of its mean keep-probability over prompts.

An ablation for docs/TRAINING.md: evaluated as ``--selector static`` beside the
predictor itself, it separates what the predictor gains by choosing per prompt
from what it gains by having learned a better mask shared by every prompt.

Usage: python scripts/predictor_mean_mask.py PROMPTS.jsonl OUT.safetensors [--model M] [--predictor DIR]
"""

import argparse
from pathlib import Path

# isort: off
import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
import mlx.core as mx

# isort: on
from ifp_mlx.convert.registry import DEFAULT_MODEL, resolve_model

from ifp_mlx.data.records import read_records
from ifp_mlx.engine.prompts import prompt_tokens
from ifp_mlx.model.load import load
from ifp_mlx.model.masks import save_mask
from ifp_mlx.select.base import resolve_k, top_k
from ifp_mlx.select.predictor import PredictorSelector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", type=Path, help="jsonl with prompt records (e.g. the SFT data)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--predictor", type=Path, help="predictor folder (default: the model's own)")
    args = parser.parse_args()
    loaded = load(resolve_model(args.model), dense=False)
    selector = PredictorSelector.for_model(loaded, args.predictor)
    prompts = [r["prompt"] for r in read_records(args.prompts) if "prompt" in r]
    total = 0
    for prompt in prompts:
        total = total + mx.sigmoid(selector.scores(prompt_tokens(loaded.tokenizer, prompt)))
        mx.eval(total)
    k = resolve_k(loaded.d_ff, selector.keep)
    info = {"predictor_mean_over": str(args.prompts), "prompts": len(prompts)}
    print(f"wrote {save_mask(args.out, top_k(total / len(prompts), k), loaded.config, info)} (k {k}, {len(prompts)} prompts)")


if __name__ == "__main__":
    main()
