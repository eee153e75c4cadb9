"""From finished cells to what a user reads: one row per (selector, keep), tables, and the JSON summary.

A row gathers a selector's cells at one keep across the tasks: each task's
accuracy, each NLL column (a task's reference NLL, or per domain for jsonl
files), and the overlap of its masks within and across domains.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .overlap import layer_overlaps, unpack_mask, within_across
from .results import Cell, Results


@dataclass
class Row:
    selector: str
    keep: float
    k: int
    accuracy: dict[str, float] = field(default_factory=dict)  # task -> accuracy
    nll: dict[str, float] = field(default_factory=dict)  # column -> mean NLL
    within: float = float("nan")
    across: float = float("nan")
    overlaps: dict = field(default_factory=dict)  # (domain, domain) -> (per-layer overlap, pairs)

    @property
    def name(self) -> str:
        return f"{self.selector} keep {self.keep:g}"


def summarize(results: Results, cells: list[Cell], num_layers: int, d_ff: int) -> list[Row]:
    """One row per (selector, keep) of ``cells``, in the grid's order, from the cells ``results`` holds."""
    rows: dict[tuple[str, float], Row] = {}
    masks: dict[tuple[str, float], list] = {}
    task_names = {cell.task for cell in cells}
    for cell in cells:
        result = results.cells.get(cell.key)
        if result is None:
            continue
        key = (cell.selector, cell.keep)
        row = rows.setdefault(key, Row(cell.selector, cell.keep, result["k"]))
        metrics = result["metrics"]
        if "accuracy" in metrics:
            row.accuracy[cell.task] = metrics["accuracy"]
        if "domains" in metrics:  # a jsonl file's domain named like a task ("math") gets a prefix
            row.nll.update({d if d not in task_names else f"nll:{d}": v for d, v in metrics["domains"].items()})
        elif "nll" in metrics:
            row.nll[cell.task] = metrics["nll"]
        masks.setdefault(key, []).extend(
            (item["domain"], item["id"], unpack_mask(item["mask"], num_layers, d_ff))
            for item in result["items"] if item.get("mask")
        )
    for key, row in rows.items():
        row.overlaps = layer_overlaps(masks.get(key, []), d_ff)
        row.within, row.across = within_across(row.overlaps)
    return list(rows.values())


def columns(rows: list[Row], attribute: str) -> list[str]:
    """The columns any row has, in the order first seen."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(getattr(row, attribute)))
    return list(seen)


def _number(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _label(row: Row, show_keep: bool) -> tuple[str, ...]:
    return (row.selector, f"{row.keep:g}") if show_keep else (row.selector,)


def accuracy_table(rows: list[Row], show_keep: bool) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Headers and cells of the accuracy table (pass@1, exact match, MMLU, harness metrics)."""
    tasks = columns(rows, "accuracy")
    headers = ("selector", *(("keep",) if show_keep else ()), *(t.removeprefix("lm-eval:") for t in tasks))
    return headers, [(*_label(r, show_keep), *(_number(r.accuracy.get(t)) for t in tasks)) for r in rows if r.accuracy]


def nll_table(rows: list[Row], show_keep: bool) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Headers and cells of the NLL table, with mask overlap within and across domains."""
    names = columns(rows, "nll")
    headers = ("selector", *(("keep",) if show_keep else ()), *names, "within", "across")
    return headers, [
        (*_label(r, show_keep), *(_number(r.nll.get(n)) for n in names), _number(r.within), _number(r.across))
        for r in rows if r.nll
    ]


def summary_json(rows: list[Row]) -> list[dict]:
    """The rows for the results file."""
    return [
        {
            "selector": r.selector, "keep": r.keep, "k": r.k,
            "accuracy": dict(r.accuracy), "nll": dict(r.nll),
            "overlap_within": r.within, "overlap_across": r.across,
            "overlap_per_layer": {" x ".join(pair): {"pairs": n, "layers": np.round(v, 4).tolist()} for pair, (v, n) in r.overlaps.items()},
        }
        for r in rows
    ]


def legacy_summary(rows: list[Row], keep: float, examples: int) -> dict:
    """The summary ``ifp eval FILES --json`` has always written (one keep ratio, selectors by name)."""
    return {
        "keep": keep, "examples": examples,
        "selectors": {r.selector: {"nll": dict(r.nll), "overlap_within": r.within,
                                   "overlap_across": r.across} for r in rows},
    }
