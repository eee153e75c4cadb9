"""The typer app and what every ``ifp`` command shares: console, progress, model lookup.

Errors the user can fix (IFPError) print as one line on stderr and exit 2.
"""

from pathlib import Path
from typing import Optional, Sequence

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

app = typer.Typer(
    help="Instruction-Following Pruning on MLX: per-prompt FFN pruning for fast local generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


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
    from ..convert.registry import resolve_model

    with byte_progress("converting") as progress:
        return resolve_model(model, log=log, progress=progress_callback(progress, "converting"))


def print_columns(headers: Sequence[str], rows: Sequence[Sequence[str]], title: Optional[str] = None) -> None:
    """Print rows as plain space-aligned columns on stdout.

    Not a rich table: rich fits tables to the terminal (80 columns, or 80 in a
    pipe) by cutting names with an ellipsis or folding paths over lines, so a
    user could neither read nor copy them. Here every cell prints whole, each
    row on one line; the last column (a path or description) is not padded,
    and lines longer than the terminal wrap there as any long text does.
    """
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    if title:
        print(title)
    for row in (headers, *rows):
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths)] + [str(row[-1])]
        print("  ".join(cells).rstrip())
