"""`ifp bench`: speed and memory of dense, pruned and low-memory generation (docs/BENCHMARKS.md)."""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import IFPError
from .app import app, err, log, resolve

T = TypeVar("T")
COMPARE = ("mlx-lm", "compact", "gather")


def split_list(values: Optional[list[str]], option: str, parse: Callable[[str], T]) -> tuple[T, ...]:
    """``--opt 1,2 --opt 3`` -> (1, 2, 3); a value that does not parse is a one-line error."""
    items = [item.strip() for value in values or () for item in value.split(",") if item.strip()]
    try:
        return tuple(parse(item) for item in items)
    except ValueError:
        raise IFPError(f"{option}: {', '.join(items)} is not a list of {'numbers' if parse is not str else 'names'}") from None


@contextmanager
def progress_bar() -> Iterator[tuple[Callable[[int], None], Callable[[str], None]]]:
    """A rich bar on stderr: ``on_plan(total)`` sizes it, ``on_run(what)`` starts each reply."""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal,
    )
    task = bar.add_task("loading", total=None)
    started = [0]

    def on_plan(total: int) -> None:
        bar.update(task, total=total)

    def on_run(what: str) -> None:
        bar.update(task, completed=started[0], description=what)
        started[0] += 1

    with bar:
        yield on_plan, on_run


@contextmanager
def model_folder(
    model: Optional[str], shape: Optional[str], dtype: str, quantize: bool, bits: Optional[int],
    layers: Optional[int], vocab: Optional[int], shape_dir: Optional[Path],
) -> Iterator[Path]:
    """The model folder to measure: ``--model``'s, or a random-weight model of ``--shape``."""
    if shape is None:
        if quantize or bits is not None or layers is not None or vocab is not None:
            raise IFPError("-q, --bits, --layers and --vocab shape a random-weight model: they go with --shape")
        yield resolve(model)
        return
    if model is not None:
        raise IFPError("give --model or --shape, not both")
    from ..bench.shapes import shape_model

    with shape_model(shape, dtype, quantize, bits, layers, vocab, shape_dir, log=log) as path:
        yield path


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model [default: smollm2-135m]"),
    prompt_tokens: Optional[list[str]] = typer.Option(None, "--prompt-tokens", "-p", help="prompt lengths, comma-separated or repeated [default: 512]"),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="tokens generated per reply"),
    repetitions: int = typer.Option(5, "--repetitions", "-r", help="timed replies per test, after one warm-up (--compare: rounds)"),
    keep: Optional[list[str]] = typer.Option(None, "--keep", help="keep ratios, comma-separated; 1.0 is the dense row [default: 0.5]"),
    selector: Optional[list[str]] = typer.Option(None, "--selector", "-s", help="pruning selectors, comma-separated [default: the model's default]"),
    low_memory: bool = typer.Option(False, "--low-memory", help="also run every pruned row with the bank on disk"),
    cold: bool = typer.Option(False, "--cold", help="--low-memory rows: drop the bank from the page cache before each reply"),
    no_reference: bool = typer.Option(False, "--no-reference", help="skip the mlx-lm stream_generate row"),
    alternate: bool = typer.Option(False, "--alternate", help="hold every row at once and take turns, one reply each per round: steadier speed-ups on a busy machine, no memory figures"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write every repetition, the means, settings and machine here"),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="plot tok/s and memory against keep (.png, .pdf or .svg)"),
    shape: Optional[str] = typer.Option(None, "--shape", help="a random-weight model of a real shape: llama-1b | llama-3b | llama-8b | qwen2.5-1.5b"),
    dtype: str = typer.Option("float32", "--dtype", help="--shape: float32 | float16 | bfloat16"),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="--shape: quantize the random model"),
    bits: Optional[int] = typer.Option(None, "--bits", help="--shape: bits per weight (implies -q) [default: 4]"),
    layers: Optional[int] = typer.Option(None, "--layers", help="--shape: layers instead of the shape's own"),
    vocab: Optional[int] = typer.Option(None, "--vocab", help="--shape: vocabulary size [default: 32768, not the real one]"),
    shape_dir: Optional[Path] = typer.Option(None, "--shape-dir", help="--shape: build the model here and reuse it [default: a temporary folder]"),
    compare: Optional[str] = typer.Option(None, "--compare", help="ratio tools, contenders alternated: mlx-lm | compact | gather"),
    hidden: int = typer.Option(1024, "--hidden", help="--compare compact/gather: hidden size of the random llama"),
    d_ff: int = typer.Option(4096, "--d-ff", help="--compare compact/gather: FFN width of the random llama"),
    decode_prompt_tokens: int = typer.Option(32, "--decode-prompt-tokens", help="--compare compact: prompt length of the decode runs"),
) -> None:
    """Benchmark dense, pruned and low-memory generation, llama-bench style; markdown on stdout.

    Rows: dense, mlx-lm's stream_generate on the same weights, and each keep x selector (with --low-memory also with the bank on disk), at each prompt length: a warm-up, then -r timed replies. Prints prompt and generation tok/s (mean ± std), the decode speed-up over dense beside the ideal one from bytes read per token, the time to first token split into select / gather (or disk read) / prefill / first token, and MLX's and the process's peak memory.

    --compare keeps the older ratio tools (JSON on stdout): mlx-lm (dense ifp vs mlx-lm), compact (the compact submodel vs a dense model of FFN width k) and gather (the gather's share of the time to first token), contenders alternated.

    Examples: ifp bench -m qwen2.5-coder-0.5b -p 512,2048 -n 128 -r 5 --keep 1.0,0.5,0.33 --low-memory

    ifp bench --shape llama-1b -q -p 128 -n 32 --keep 0.5 --selector activations --json out.json

    ifp bench --compare compact --keep 0.5,0.33 -r 7
    """
    from ..bench.settings import Settings, check_selectors, check_settings
    from ..bench.shapes import check_build, shape as shape_spec

    settings = Settings(
        prompt_tokens=split_list(prompt_tokens, "-p", int) or (512,), max_tokens=max_tokens, repetitions=repetitions,
        keeps=split_list(keep, "--keep", float) or (0.5,), selectors=split_list(selector, "--selector", str),
        low_memory=low_memory, reference=not no_reference, cold=cold, alternate=alternate,
    )
    check_settings(settings)
    check_build(dtype, bits)
    if shape is not None:
        shape_spec(shape)
    check_selectors(settings.selectors)
    if compare is not None:
        keeps = tuple(k for k in split_list(keep, "--keep", float) if k < 1) or (0.5, 0.33)
        run_compare(compare, model, shape, layers, vocab, hidden, d_ff, settings, keeps, decode_prompt_tokens)
        return
    if cold and not low_memory:
        raise IFPError("--cold evicts the bank before disk reads: it goes with --low-memory")
    if plot_file is not None:
        check_plot(plot_file)
    extra = {"shape": shape, "shape_dtype": dtype if shape else None, "shape_bits": (bits or 4) if shape and (quantize or bits) else None}
    with model_folder(model, shape, dtype, quantize, bits, layers, vocab, shape_dir) as path:
        from ..bench.report import plot, render, write_json
        from ..bench.suite import run_bench

        with progress_bar() as (on_plan, on_run):
            results = run_bench(path, settings, on_run=on_run, on_plan=on_plan, extra=extra)
    print(render(results), end="")
    if json_file is not None:
        write_json(results, str(json_file))
        log(f"wrote {json_file}")
    if plot_file is not None:
        plot(results, str(plot_file))
        log(f"wrote {plot_file}")


def check_plot(path: Path) -> None:
    """Refuse a plot that cannot be written before the benchmark runs for minutes."""
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise IFPError(f"--plot {path}: name a .png, .pdf or .svg file")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise IFPError("--plot needs matplotlib: pip install matplotlib") from None


def run_compare(
    compare: str, model: Optional[str], shape: Optional[str], layers: Optional[int], vocab: Optional[int],
    hidden: int, d_ff: int, settings, keeps: tuple[float, ...], decode_prompt_tokens: int,
) -> None:
    """The ratio tools of ``--compare``; their results as JSON on stdout."""
    if compare not in COMPARE:
        raise IFPError(f"unknown --compare {compare!r}: choose one of {', '.join(COMPARE)}")
    p, rounds = settings.prompt_tokens[0], settings.repetitions
    if compare == "mlx-lm":
        from mlx_lm.utils import load_tokenizer

        from ..bench.ratios import dense_vs_mlx_lm, synthetic_prompt
        from ..model.load import read_config

        path = resolve(model)
        read_config(path)
        tokens = synthetic_prompt(load_tokenizer(path), p)
        result = dense_vs_mlx_lm(str(path), tokens, max_tokens=settings.max_tokens, rounds=rounds)
        print(json.dumps({"model": str(path), "prompt_tokens": len(tokens), "max_tokens": settings.max_tokens, **result}, indent=2))
        return
    from ..bench.ratios import compact_benchmark
    from ..bench.shapes import shape as shape_spec

    if shape is not None:
        s = shape_spec(shape)
        hidden, d_ff, layers = s.hidden, s.d_ff, layers or s.layers
    result = compact_benchmark(
        hidden=hidden, d_ff=d_ff, layers=layers or 8, keeps=keeps, prompt_tokens=p,
        decode_prompt_tokens=decode_prompt_tokens, max_tokens=settings.max_tokens, rounds=rounds,
        vocab=vocab or 2048, parts=("decode",) if compare == "compact" else ("gather",), log=log,
    )
    print(json.dumps(result, indent=2))
