"""Response NLL per domain for several predictor folders (with their adapters), and dense.

The same measure as ``ifp eval`` (the prompt picks the mask; the pruned model, with the
predictor's adapter when it has one, processes prompt and response), for comparing
predictors before one is shipped. A name among SELECTORS (``activations``: GRIFFIN)
instead of a folder is that selector; every row prunes to ``--keep`` (default 0.5);
``--no-dense`` leaves the dense row out (it is the same for every predictor of a
model). Usage:
    python scripts/eval_predictors.py MODEL LIMIT FILE... [--no-dense] [--keep R] -- PREDICTOR...
"""

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import ifp_mlx  # noqa: F401  (first: OpenBLAS before mlx.core)
from ifp_mlx.engine.engine import Engine
from ifp_mlx.evaluate.grid import EVAL_SUBMODELS
from ifp_mlx.evaluate.nll import example_tokens, read_examples, response_nll
from ifp_mlx.model.load import load
from ifp_mlx.model.masks import mask_overlap
from ifp_mlx.select.choose import choose


def evaluate(engine: Engine, examples) -> tuple[dict, list]:
    sums, counts, masks = defaultdict(float), defaultdict(int), []
    for example in examples:
        prompt, response = example_tokens(engine.loaded, example)
        selection = engine.select(prompt)
        engine.use(selection)
        sums[example.domain] += response_nll(engine.loaded, prompt, response)
        counts[example.domain] += 1
        masks.append((example.domain, selection.indices))
    return {d: round(sums[d] / counts[d], 3) for d in sorted(sums)}, masks


def overlaps(masks: list, d_ff: int) -> tuple[float, float]:
    within, across = [], []
    for i, (da, a) in enumerate(masks):
        for db, b in masks[i + 1 :]:
            (within if da == db else across).append(mask_overlap(a, b, d_ff))
    return round(sum(within) / len(within), 3), round(sum(across) / len(across), 3)


SELECTORS = ("activations", "static", "random")


def main() -> None:
    split = sys.argv.index("--")
    args = [a for a in sys.argv[1:split] if a != "--no-dense"]
    keep = 0.5
    if "--keep" in args:
        at = args.index("--keep")
        keep = float(args[at + 1])
        del args[at : at + 2]
    model, limit, files = args[0], int(args[1]), [Path(f) for f in args[2:]]
    predictors = sys.argv[split + 1 :]
    loaded = load(model, dense=False)
    examples = read_examples(files, limit)
    rows = {}
    start = time.perf_counter()
    if "--no-dense" not in sys.argv[1:split]:
        rows["dense"] = evaluate(Engine.for_choice(loaded, choose(loaded)), examples)[0]
    for path in predictors:
        choice = choose(loaded, path, keep=keep) if path in SELECTORS else choose(loaded, "predictor", keep=keep, predictor=Path(path))
        engine = Engine.for_choice(loaded, choice, EVAL_SUBMODELS)
        nll, masks = evaluate(engine, examples)
        rows[path] = {**nll, "overlap_within_across": overlaps(masks, loaded.d_ff), "adapter": engine.selector.adapter is not None}
    print(json.dumps({"keep": keep, "examples": len(examples), "seconds": round(time.perf_counter() - start), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
