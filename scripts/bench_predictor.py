"""Selection time of a ``shared:N`` predictor against the compact model's prefill.

A random-weight predictor (the timing does not depend on trained weights) on a
converted model reads a prompt of ``--prompt-tokens`` tokens; the contenders are
timed alternately in one run (ifp_mlx.bench.alternate) and reported as medians
and ratios, never as absolute figures to compare across machines:

- select:        the predictor: first N layers (dense FFN) + final norm + head + top-k
- prefill:       the gathered compact model (keep ratio --keep) over the prompt
- dense prefill: the unpruned model over the prompt (what ``activations`` pays to select)

Usage: python scripts/bench_predictor.py [--model tests/.cache/smollm2-f32] [--layers 4]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

# isort: off
import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

# isort: on
from ifp_mlx.bench.ratios import alternate, synthetic_prompt
from ifp_mlx.engine.engine import Engine
from ifp_mlx.model.load import load
from ifp_mlx.select.predictor import PredictorSelector, create_predictor, save_predictor

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "tests" / ".cache" / "smollm2-f32"


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench(model: Path, layers: int, prompt_tokens: int, keep: float, rounds: int) -> dict:
    loaded = load(model, dense=False)
    mx.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_predictor(Path(tmp) / "predictor", create_predictor(loaded, f"shared:{layers}"), loaded.config, keep)
        selector = PredictorSelector.for_model(loaded, Path(tmp) / "predictor")
    engine = Engine.create(loaded, selector, keep=keep)
    engine.warm_up()
    tokens = synthetic_prompt(loaded.tokenizer, prompt_tokens)
    selection = engine.select(tokens)
    compact, _ = engine.submodel(selection)
    dense = loaded.dense_ffn()

    def prefill(ffn) -> None:
        loaded.assign(ffn)
        engine._prefill(tokens, make_prompt_cache(loaded.model))

    times = alternate(
        {
            "select": lambda: timed(lambda: engine.select(tokens)),
            "prefill": lambda: timed(lambda: prefill(compact)),
            "dense prefill": lambda: timed(lambda: prefill(dense)),
        },
        rounds,
    )
    ms = {name: statistics.median(runs) * 1000 for name, runs in times.items()}
    return {
        "model": str(model),
        "backbone": f"shared:{layers}",
        "model_layers": loaded.num_layers,
        "prompt_tokens": len(tokens),
        "k": f"{engine.k}/{loaded.d_ff}",
        "rounds": rounds,
        "median_ms": {name: round(v, 1) for name, v in ms.items()},
        "select / prefill": round(ms["select"] / ms["prefill"], 3),
        "select / dense prefill": round(ms["select"] / ms["dense prefill"], 3),
        "prefill / dense prefill": round(ms["prefill"] / ms["dense prefill"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, default=4, help="N of the shared:N backbone")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(json.dumps(bench(args.model, args.layers, args.prompt_tokens, args.keep, args.rounds), indent=2))


if __name__ == "__main__":
    main()
