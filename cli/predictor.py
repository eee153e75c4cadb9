"""`ifp convert-predictor`: PyTorch IFPruning predictor checkpoints into predictor folders."""

from pathlib import Path
from typing import Optional

import typer

from .app import app, err, resolve


@app.command("convert-predictor")
def convert_predictor(
    src: Path = typer.Argument(..., help="state-dict file, or a folder with extractor.pt + mask_head.pt or predictor.safetensors"),
    out: Path = typer.Argument(..., help="output predictor folder (MODEL/predictor makes it the model's default)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the model the predictor prunes: folder or named model (default smollm2-135m)"),
    backbone_config: Optional[Path] = typer.Option(None, "--backbone-config", help="the backbone's HF config.json (layouts without one)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="folder of the backbone's tokenizer (default: the target's)"),
    activation: Optional[str] = typer.Option(None, "--activation", help="head activation: none | gelu | leaky_relu (default: the layout's)"),
    keep: Optional[float] = typer.Option(None, "--keep", help="default keep ratio (default: the checkpoint's top-k, else 0.5)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: the source's)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
) -> None:
    """Convert a PyTorch sparsity-predictor checkpoint (three public layouts) for a model.

    Example: ifp convert-predictor ./step_00001000 ./smollm2-mlx/predictor --model ./smollm2-mlx
    """
    from ..convert.predictor import convert_predictor as run

    path = run(src, out, resolve(model), backbone_config, tokenizer, activation, keep, dtype, force)
    err.print(f"wrote predictor {path}", highlight=False)
