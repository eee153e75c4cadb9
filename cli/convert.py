"""`ifp convert`: checkpoints into ifp model folders."""

from pathlib import Path
from typing import Optional

import typer

from .app import app, byte_progress, err, progress_callback


@app.command()
def convert(
    src: Path = typer.Argument(..., help="HF folder, .safetensors/.bin/.pt/.pth state dict, or .gguf file"),
    out: Path = typer.Argument(..., help="output model folder"),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a single state-dict file"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: the source's; for GGUF float32 on a CPU, float16 on an Apple GPU)"),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="affine-quantize weights and the FFN bank"),
    bits: int = typer.Option(4, "--bits", help="bits per weight with -q"),
    group_size: int = typer.Option(64, "--group-size", help="quantization group size with -q"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
) -> None:
    """Convert a checkpoint into an ifp model folder.

    Example: ifp convert ./SmolLM2-135M-Instruct ./smollm2-mlx --dtype float16 -q --bits 8
    """
    from ..convert import ConvertOptions
    from ..convert import convert as run_convert

    options = ConvertOptions(dtype=dtype, quantize=quantize, bits=bits, group_size=group_size, force=force)
    with byte_progress("converting") as progress:
        summary = run_convert(src, out, options, config_path=config, progress=progress_callback(progress, "converting"))
    err.print(
        f"wrote {summary.out}: {summary.parameters / 1e6:.1f}M parameters in {summary.dtype}"
        f"{f' ({summary.dtype_reason})' if summary.dtype_reason else ''}, "
        f"{summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s",
        highlight=False,
    )
