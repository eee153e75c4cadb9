"""`ifp train`: train a sparsity predictor for a model, in MLX."""

from pathlib import Path
from typing import Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from .app import app, err, log, resolve


@app.command()
def train(
    data: list[Path] = typer.Argument(..., help="training jsonl files (prompt/response pairs, or text for --stage pretrain)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model (default smollm2-135m)"),
    out: Path = typer.Option(..., "--out", "-o", help="predictor folder to write (checkpoints go inside it while training)"),
    stage: str = typer.Option("distill", "--stage", help="distill | sft | pretrain"),
    keep: float = typer.Option(0.5, "--keep", help="fraction of FFN channels the masks keep"),
    backbone: str = typer.Option("shared:4", "--backbone", help="shared:N or a model folder"),
    distill_target: str = typer.Option("sequence", "--distill-target", help="sequence (prompt + reply activations) | oracle (reply) | activations (prompt)"),
    steps: int = typer.Option(200, "--steps", help="optimizer steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples per step"),
    learning_rate: float = typer.Option(1e-3, "--lr", help="AdamW learning rate"),
    temperature: float = typer.Option(0.5, "--temperature", help="SoftTopK temperature"),
    train_llm: str = typer.Option("none", "--train-llm", help="none | lora (adapters saved beside the predictor: used only when pruning)"),
    lora_on: str = typer.Option("attention", "--lora-on", help="with --train-llm lora: attention | ffn | all"),
    lora_rank: int = typer.Option(8, "--lora-rank", help="with --train-llm lora: the adapters' rank"),
    freeze_predictor: bool = typer.Option(False, "--freeze-predictor", help="with --train-llm lora: train the adapters alone, under the --init predictor's masks"),
    init: Optional[Path] = typer.Option(None, "--init", help="start from this predictor folder (e.g. a distilled one)"),
    init_mask: Optional[Path] = typer.Option(None, "--init-mask", help="start as this static mask (from ifp calibrate) for every prompt"),
    limit: Optional[int] = typer.Option(None, "--limit", help="examples per file"),
    log_every: int = typer.Option(25, "--log-every", help="steps between loss / mask-diversity lines"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
    force: bool = typer.Option(False, "--force", help="replace an existing predictor folder at --out"),
) -> None:
    """Train the predictor: distil target masks, then (optionally) SFT through the masked LLM.

    Example: ifp train data/code.train.jsonl data/math.train.jsonl --out smollm2-predictor --stage distill --steps 300

    Data-parallel on several processes (one machine or a few Macs): mlx.launch -n 2 --backend ring -- ifp train ...
    """
    from ..data.records import read_records
    from ..errors import IFPError
    from ..model.load import load
    from ..train.trainer import (
        TrainConfig,
        Trainer,
        checkpoint_state,
        diversity_pairs,
        export,
        make_pairs,
        start_predictor,
    )

    config = TrainConfig(
        stage=stage, keep=keep, backbone=backbone, distill_target=distill_target, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, temperature=temperature, train_llm=train_llm, log_every=log_every,
        freeze_predictor=freeze_predictor, lora_on=lora_on, lora_rank=lora_rank,
    )
    config.check()
    if (out / "config.json").exists() and not force and not resume:
        raise IFPError(f"{out} already exists (use --force to overwrite, or --resume)")
    work = out.parent / f".{out.name}.training"
    if resume:
        checkpoint_state(work, stage)
    records = [r for path in data for r in read_records(path)[:limit]]
    loaded = load(resolve(model), dense=False)
    predictor = start_predictor(loaded, config, init, init_mask)
    pairs = make_pairs(loaded, records, config)
    trainer = Trainer(loaded, predictor, pairs, config, work, diversity_pairs(loaded), log=log)
    if resume:
        trainer.resume()
        log(f"resumed at step {trainer.step}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"training ({stage})", total=steps, completed=trainer.step, info="")

        def update(step: int, total: int, loss: float, rate: float) -> None:
            info = f"loss {loss:.4f}" + (f" {rate:.0f} tok/s" if rate else "")
            progress.update(task, completed=step, info=info)

        trainer.train(update)
    if not trainer.is_writer:  # data-parallel: the first process writes the folder
        return
    path = export(trainer, out, force=True)
    err.print(f"wrote {path} (k {trainer.k}/{loaded.d_ff} per layer, {trainer.step} steps)", highlight=False)
