"""Run a grid of tasks x selectors x keep ratios, one cell at a time, skipping finished cells.

Every selector comes from ``select.choose`` (the one rule every command uses),
except the oracle, which only an evaluation can build (it needs the reference
answer). A cell gets a fresh engine, so its submodel cache never carries one
cell's selections into another's timing or memory.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..engine.engine import Engine
from ..errors import IFPError
from ..model.load import LoadedModel
from ..select.choose import SELECTORS, choose, sized
from .humaneval import HumanEvalTask
from .gsm import MathTask
from .mmlu import MMLUTask
from .oracle import OracleSelector
from .results import EVAL_SELECTORS, TASKS, Cell, Results
from .sandbox import Limits
from .tasks import NoProgress, Progress



@dataclass
class SelectorOptions:
    """What ``choose`` needs beyond a name and a keep ratio."""

    mask: Optional[Path] = None  # the static selector's mask file
    predictor: Optional[Path] = None  # the predictor selector's folder
    seed: int = 0  # the random selector's


@dataclass
class TaskOptions:
    max_tokens: Optional[int] = None  # replaces each generating task's own budget
    limits: Limits = field(default_factory=Limits)  # the HumanEval sandbox's


def make_task(name: str, options: TaskOptions):
    """A built-in task by name (``--tasks``)."""
    if name == "humaneval":
        return HumanEvalTask(options.max_tokens, options.limits)
    if name == "math":
        return MathTask(options.max_tokens)
    if name in ("mmlu-0shot", "mmlu-5shot"):
        return MMLUTask(int(name[5]))
    raise IFPError(f"unknown task {name!r}: choose from {', '.join(TASKS)} (jsonl files go as arguments, harness tasks with --lm-eval)")


# Every item is a new prompt, so a cached submodel is never used again; holding the
# engine's usual few would multiply the memory the run's fit check budgets (bank plus
# one submodel): at keep 0.5 four of Qwen2.5-Coder-1.5B's are 9 GB in float32.
EVAL_SUBMODELS = 1


def make_engine(loaded: LoadedModel, selector: str, keep: float, options: SelectorOptions) -> Engine:
    """The engine of one cell: dense keeps every channel; the others keep ``keep`` of them."""
    if selector == "oracle":
        return Engine.for_choice(loaded, sized(OracleSelector(loaded), loaded.d_ff, keep), EVAL_SUBMODELS)
    if selector not in SELECTORS:
        raise IFPError(f"unknown selector {selector!r}: choose from {', '.join(EVAL_SELECTORS)}")
    choice = choose(
        loaded, selector, None if selector == "dense" else keep,
        mask=options.mask if selector == "static" else None,
        predictor=options.predictor if selector == "predictor" else None, seed=options.seed,
    )
    return Engine.for_choice(loaded, choice, EVAL_SUBMODELS)


def run_grid(
    loaded: LoadedModel,
    tasks: dict,
    cells: list[Cell],
    results: Results,
    limits: Optional[dict[str, Optional[int]]] = None,
    selector_options: SelectorOptions = SelectorOptions(),
    progress: Progress = NoProgress(),
    log: Callable[[str], None] = lambda message: None,
) -> list[Cell]:
    """Run the cells ``results`` does not hold yet, saving after each; returns the cells it ran.

    ``tasks``: name -> task (an ``ItemTask``, or a harness task); each task's
    items are prepared once, the first time one of its cells runs.
    ``limits``: items per task (None or absent: all of them).
    """
    limits = limits or {}
    prepared: dict[str, object] = {}
    ran = []
    for cell in cells:
        limit = limits.get(cell.task)
        if results.done(cell, limit):
            log(f"{cell.label}: in the results file, not rerun")
            continue
        if cell.key in results.cells:
            log(f"{cell.label}: in the results file with --limit {results.cells[cell.key].get('limit')}, rerun with {limit}")
        task = tasks[cell.task]
        if cell.task not in prepared:
            prepared[cell.task] = task.prepare(loaded, limit)
        items = prepared[cell.task]
        engine = make_engine(loaded, cell.selector, cell.keep, selector_options)
        progress.start(cell.label, len(items) if items is not None else None)
        start = time.perf_counter()
        outcome = task.run(engine, items, progress)
        results.add(cell, {
            "task": cell.task, "selector": cell.selector, "keep": cell.keep, "k": engine.k, "limit": limit,
            "seconds": round(time.perf_counter() - start, 2), **outcome,
        })
        ran.append(cell)
    return ran
