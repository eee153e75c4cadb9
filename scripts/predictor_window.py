"""What the predictor's prompt window costs on prompts longer than it.

For each example whose prompt (in the chat template) is longer than the window,
the mask is chosen twice: from the windowed prompt (the first and last halves
of the window, as selection does) and from the whole prompt (window 0). It
reports, per domain, the mean overlap of the two masks (|A and B| / k), the
response NLL under each (the pruned model, with the predictor's adapter,
processing prompt and response, as ``ifp eval`` does), and the selection time
of each. Usage:
    python scripts/predictor_window.py MODEL PER_DOMAIN FILE...
"""

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import ifp_mlx  # noqa: F401  (first: OpenBLAS before mlx.core)
from ifp_mlx.engine.engine import Engine
from ifp_mlx.evaluate.nll import example_tokens, read_examples, response_nll
from ifp_mlx.model.load import load
from ifp_mlx.model.masks import mask_overlap
from ifp_mlx.select.choose import choose


def main() -> None:
    model, per_domain, files = sys.argv[1], int(sys.argv[2]), [Path(f) for f in sys.argv[3:]]
    loaded = load(model, dense=False)
    engine = Engine.for_choice(loaded, choose(loaded, "predictor", keep=0.5))
    predictor = engine.selector.predictor
    window = predictor.window
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for example in read_examples(files):
        prompt, response = example_tokens(loaded, example)
        row = sums[example.domain]
        if len(prompt) <= window or row["examples"] >= per_domain:
            continue
        row["examples"] += 1
        row["prompt tokens"] += len(prompt)
        picked = {}
        for name, size in (("window", window), ("whole", 0)):
            predictor.window = size
            start = time.perf_counter()
            picked[name] = engine.select(prompt)
            row[f"select s ({name})"] += time.perf_counter() - start
            engine.use(picked[name])
            row[f"nll ({name})"] += response_nll(loaded, prompt, response)
        predictor.window = window
        row["overlap"] += mask_overlap(picked["window"].indices, picked["whole"].indices, loaded.d_ff)
    table = {d: {k: (int(v) if k == "examples" else round(v / row["examples"], 3)) for k, v in row.items()}
             for d, row in sums.items() if row["examples"]}
    print(json.dumps({"window": window, "domains": table}, indent=1))


if __name__ == "__main__":
    main()
