"""`ifp calibrate`: a static mask from calibration text (or the built-in text)."""

from pathlib import Path
from typing import Optional

import typer

from .app import app, byte_progress, err, resolve


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="model folder or named model"),
    text_files: Optional[list[Path]] = typer.Argument(None, help="calibration text (.txt, or .jsonl with text/prompt/response); none: the built-in calibration text"),
    out: Path = typer.Option(..., "--out", "-o", help="mask file to write (.safetensors)"),
    keep: Optional[float] = typer.Option(None, "--keep", help="fraction of FFN channels kept per layer (default 0.5)"),
    k: Optional[int] = typer.Option(None, "--k", help="FFN channels kept per layer"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="most calibration tokens to read"),
) -> None:
    """Compute a static mask (one selection for every prompt) and save it.

    Example: ifp calibrate smollm2-135m notes.txt code.jsonl --keep 0.5 --out static-0.5.safetensors
    """
    from ..model.load import load
    from ..model.masks import save_mask
    from ..select.base import resolve_k
    from ..select.calibrate import calibrate as run_calibrate
    from ..select.calibrate import read_texts

    files = text_files or []
    texts = read_texts(files)
    loaded = load(resolve(model), dense=False)
    k_value = resolve_k(loaded.d_ff, keep if keep is not None or k is not None else 0.5, k)
    with byte_progress("calibrating") as progress:
        task = progress.add_task("calibrating (tokens)", total=None)
        indices = run_calibrate(
            loaded, texts, k_value, max_tokens=max_tokens,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    info = {"selector": "static", "source": "activations" if texts else "built-in text", "files": [str(f) for f in files], "k": k_value}
    path = save_mask(out, indices, loaded.config, info)
    err.print(f"wrote {path}: k {k_value}/{loaded.d_ff} per layer from {info['source']}", highlight=False)
