"""The grid of cells and the results file that makes a run resumable.

A cell is one task under one selector at one keep ratio. The dense model runs
once per task (at keep 1); every other selector runs at each keep below 1 (at
keep 1 any selector keeps every channel, which is the dense model). After
each finished cell the whole results file is rewritten atomically (a
temporary file renamed over it), so an interrupted run loses at most the cell
in progress, and ``--resume`` runs only the cells the file does not hold.
The settings that change results (model, token budgets, mask, ...) are
stored with it; resuming with other settings is refused rather than mixing
two runs in one table. Each cell records its own ``--limit``: raising a
task's limit reruns that task's cells only.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import IFPError
from ..files import atomic_file

FORMAT = 1
TASKS = ("humaneval", "math", "mmlu-0shot", "mmlu-5shot")  # the built-in tasks (jsonl files are "nll")
# select.choose's selectors and the oracle, named here too so that options are checked before
# anything heavy is imported (tests/test_evaluate.py checks the two lists agree)
EVAL_SELECTORS = ("predictor", "activations", "static", "dense", "random", "oracle")


@dataclass(frozen=True)
class Cell:
    task: str
    selector: str
    keep: float

    @property
    def key(self) -> str:
        return f"{self.task}|{self.selector}|{self.keep:g}"

    @property
    def label(self) -> str:
        return f"{self.task} {self.selector} keep {self.keep:g}"


def grid(tasks: list[str], selectors: list[str], keeps: list[float]) -> list[Cell]:
    """The cells of a run, task by task (so each task's items are prepared once)."""
    cells = []
    for task in tasks:
        for selector in selectors:
            if selector == "dense":
                cells.append(Cell(task, "dense", 1.0))
            else:
                cells += [Cell(task, selector, keep) for keep in keeps if keep < 1]
    return cells


class Results:
    """Finished cells by key, the run's settings, and where they are written (nowhere without --json)."""

    def __init__(self, path: Optional[Path], settings: dict, cells: Optional[dict] = None):
        self.path = path
        self.settings = settings
        self.cells: dict[str, dict] = cells or {}
        self.extra: dict = {}  # summaries written beside the cells

    @classmethod
    def start(cls, path: Optional[Path], settings: dict, resume: bool = False, force: bool = False) -> "Results":
        """A new results file, or with ``resume`` the cells of an existing one (checked against ``settings``)."""
        if path is None:
            if resume:
                raise IFPError("--resume needs --json FILE: the results file of the run to continue")
            return cls(None, settings)
        path = Path(path)
        if not path.exists():
            return cls(path, settings)
        if not resume:
            if not force:
                raise IFPError(f"{path} already exists: --resume continues its run, --force starts over")
            return cls(path, settings)
        stored = read_results(path)
        check_settings(path, stored.get("settings", {}), settings)
        return cls(path, settings, stored.get("cells", {}))

    def done(self, cell: Cell, limit: Optional[int]) -> bool:
        """Whether the file holds ``cell`` run on the same items (a cell of another --limit is rerun)."""
        return cell.key in self.cells and self.cells[cell.key].get("limit") == limit

    def add(self, cell: Cell, result: dict) -> None:
        self.cells[cell.key] = result
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        report = {"format": FORMAT, "settings": self.settings, **self.extra, "cells": self.cells}
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))


def json_safe(value):
    """``value`` with NaN (a mean of nothing) as null: strict JSON, readable by jq and browsers."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_results(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IFPError(f"{path}: not a results file of `ifp eval` ({e})") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT or not isinstance(report.get("cells"), dict):
        raise IFPError(f"{path}: not a results file of `ifp eval` (format {FORMAT})")
    return report


def check_settings(path: Path, stored: dict, settings: dict) -> None:
    """Refuse to resume a run whose results were made differently."""
    for key in sorted(set(stored) | set(settings)):
        if stored.get(key) != settings.get(key):
            raise IFPError(
                f"{path} was made with {key} {stored.get(key)!r}, this run has {settings.get(key)!r}: "
                "rerun with the same options, or write to another --json file"
            )
