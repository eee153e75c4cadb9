"""Resident memory of `ifp generate` as a user would measure it, against its bounds.

Each mode runs as a whole `ifp generate` process under ``/usr/bin/time -f %M``
(its peak RSS). From that peak is taken the peak of a process that only does
the bare imports (``import ifp_mlx, mlx_lm`` and what `ifp generate` imports
before it loads a model) and loads a tiny tokenizer, whose libraries every
model load imports: what is left is what the model and the reply hold. Both
baselines are printed.
The bounds (docs/BENCHMARKS.md), with the files' sizes and k/d_ff of the bank
for the submodel:

- dense:       resident <= 1.15 x (weights file + bank file)
- pruned:      resident <= 1.15 x (non-FFN weights + bank + submodel + KV)
- --low-memory: resident <= 1.15 x (non-FFN weights + compact FFN + KV)

With the predictor, its head (float32, as loaded: 23 MB for SmolLM2's) and its
adapter (float32, plus the slice of the FFN's updates a submodel uses) are
counted among the weights: a mode that selects with it must hold them. Its
shared backbone holds nothing: those layers are the model's own.

Usage: IFP_HOME=tests/.cache/ifp python scripts/measure_memory.py -m tests/.cache/smollm2-f32 -m qwen2.5-coder-0.5b
"""

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
from ifp_mlx.convert.registry import resolve_model
from ifp_mlx.engine.memory import kv_bytes
from ifp_mlx.engine.prompts import prompt_tokens
from ifp_mlx.model.load import read_config
from ifp_mlx.select.base import resolve_k
from ifp_mlx.select.predictor import shipped_predictor

SLACK = 1.15
PROMPT = "Write a Python function that checks whether a string is a palindrome, and explain it."
# What `ifp generate` has imported when it starts loading the model (the CLI, mlx-lm,
# the loader, the engine and the selectors): the bare process imports the same.
BARE_IMPORTS = (
    "import ifp_mlx, mlx_lm, mlx.core, mlx_lm.utils, mlx_lm.generate; import ifp_mlx.cli.main; "
    "import ifp_mlx.model.load, ifp_mlx.engine.engine, ifp_mlx.engine.memory, ifp_mlx.select.choose"
)
# Loading a tokenizer imports hundreds more modules (transformers' classes for the
# model type, which pull in torch where it is installed): library code, not the
# model's. So the baseline that is subtracted also loads a 300-token byte-level
# tokenizer of the model's tokenizer class, beside a config.json of its model type.
BARE_WITH_TOKENIZER = BARE_IMPORTS + (
    "; import json, sys, tempfile, pathlib; from ifp_mlx.convert.random_model import write_byte_tokenizer; "
    "from mlx_lm.utils import load_tokenizer; d = pathlib.Path(tempfile.mkdtemp()); write_byte_tokenizer(d, 300); "
    "c = json.loads((d / 'tokenizer_config.json').read_text()); c['tokenizer_class'] = sys.argv[2]; "
    "(d / 'tokenizer_config.json').write_text(json.dumps(c)); "
    "(d / 'config.json').write_text(json.dumps({'model_type': sys.argv[1]})); load_tokenizer(d)"
)


@dataclass
class Mode:
    name: str
    args: tuple[str, ...]
    keep: Optional[float]  # None: dense
    low_memory: bool = False


def peak_rss(command: list[str]) -> int:
    """Peak resident bytes of a whole process, as ``/usr/bin/time -f %M`` reports it."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        result = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *command], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        return int(out.read().strip().splitlines()[-1]) * 1024


def bare_peaks(path: Path, config: dict) -> tuple[int, int]:
    """Peak RSS of the bare imports, and of those plus the libraries the model's tokenizer loads."""
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_class = tokenizer_config.get("tokenizer_class", "PreTrainedTokenizerFast")
    with_tokenizer = [sys.executable, "-c", BARE_WITH_TOKENIZER, config["model_type"], tokenizer_class]
    return peak_rss([sys.executable, "-c", BARE_IMPORTS]), peak_rss(with_tokenizer)


def modes(config: dict, keep: float, selectors: list[str]) -> list[Mode]:
    """Dense, then each selector at ``keep`` with the bank in memory, then on disk."""
    usable = [s for s in selectors if s != "predictor" or shipped_predictor(config) is not None]
    found = [Mode("dense", ("--selector", "dense"), None)]
    for low in (False, True):
        for s in usable:
            args = ("--keep", str(keep), "--selector", s) + (("--low-memory",) if low else ())
            found.append(Mode(f"{s} {keep:g}" + (" --low-memory" if low else ""), args, keep, low))
    return found


def bound(path: Path, config: dict, mode: Mode, context_tokens: int) -> int:
    """The bytes the mode may hold resident (before the 1.15 slack)."""
    ifp = config["ifp"]
    weights = (path / ifp["weights"]).stat().st_size
    bank = (path / ifp["bank"]["file"]).stat().st_size
    if mode.keep is None:
        return weights + bank
    d_ff = ifp["bank"]["d_ff"]
    compact = bank * resolve_k(d_ff, mode.keep) // d_ff
    kv = kv_bytes(config, context_tokens)
    head = predictor_bytes(config, mode.keep) if mode.args[mode.args.index("--selector") + 1] == "predictor" else 0
    return weights + head + compact + kv + (0 if mode.low_memory else bank)


def predictor_bytes(config: dict, keep: float) -> int:
    """The shipped predictor's head and adapter in memory (loaded in float32), with
    the FFN updates' slice for a submodel of ``keep``."""
    import mlx.core as mx

    from ifp_mlx.model.adapter import ADAPTER_FILE

    by_channel = ("gate_up_lora.lora_b", "down_lora.lora_a")  # the FFN factors a submodel slices
    folder = shipped_predictor(config)
    held = sum(w.size * 4 for w in mx.load(str(folder / "predictor.safetensors")).values())
    if (folder / ADAPTER_FILE).is_file():
        held += sum(w.size * 4 * (1 + keep * n.endswith(by_channel)) for n, w in mx.load(str(folder / ADAPTER_FILE)).items())
    return int(held)


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def context_tokens(path: Path, max_tokens: int) -> int:
    """The positions the reply's KV cache holds: the templated prompt and the reply."""
    from mlx_lm.utils import load_tokenizer

    return len(prompt_tokens(load_tokenizer(path), PROMPT, None, chat_template=True)) + max_tokens


def measure(model: str, keep: float, selectors: list[str], max_tokens: int) -> list[list[str]]:
    path = resolve_model(model, log=lambda m: None)
    config = read_config(path)
    context = context_tokens(path, max_tokens)
    imports, bare = bare_peaks(path, config)
    print(f"{path.name}: bare imports {mb(imports)} MB peak RSS, with its tokenizer's libraries {mb(bare)} MB", file=sys.stderr)
    rows = []
    for mode in modes(config, keep, selectors):
        command = [sys.executable, "-m", "ifp_mlx.cli.main", "generate", PROMPT, "-m", str(path), "-n", str(max_tokens), *mode.args]
        peak = peak_rss(command)
        resident = peak - bare
        limit = SLACK * bound(path, config, mode, context)
        rows.append([path.name, mode.name, mb(peak), mb(bare), mb(resident), mb(limit), f"{resident / limit:.2f}",
                     "yes" if resident <= limit else f"no (+{100 * (resident / limit - 1):.0f}%)",
                     f"{(peak - imports) / limit:.2f}"])
        print(f"  {path.name} {mode.name}: peak {mb(peak)} MB, resident {mb(resident)} MB", file=sys.stderr)
    return rows


def file_row(model: str, max_tokens: int) -> list[str]:
    path = resolve_model(model, log=lambda m: None)
    config = read_config(path)
    ifp = config["ifp"]
    weights = (path / ifp["weights"]).stat().st_size
    bank = (path / ifp["bank"]["file"]).stat().st_size
    kv = kv_bytes(config, context_tokens(path, max_tokens))
    return [path.name, ifp["dtype"], mb(weights), mb(bank), f"{kv / 1e6:.1f}"]


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", action="append", help="model folder or named model (repeatable)")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--selectors", default="predictor,activations", help="comma-separated (predictor only where the model has one)")
    parser.add_argument("-n", "--max-tokens", type=int, default=32)
    args = parser.parse_args()
    models = args.model or ["smollm2-135m"]
    selectors = [s for s in args.selectors.split(",") if s]
    results = [row for model in models for row in measure(model, args.keep, selectors, args.max_tokens)]
    print(table(["model", "dtype", "weights MB (non-FFN)", "bank MB", "KV MB (bound)"], [file_row(m, args.max_tokens) for m in models]))
    print()
    print(f"resident = peak RSS - bare (imports and the tokenizer's libraries); bound = {SLACK} x the sizes "
          "above, as the docstring says; the last column subtracts the bare imports only.")
    print()
    headers = ["model", "mode", "peak RSS MB", "bare MB", "resident MB", "bound MB", "resident/bound", "within", "same, less bare imports only"]
    print(table(headers, results))


if __name__ == "__main__":
    main()
