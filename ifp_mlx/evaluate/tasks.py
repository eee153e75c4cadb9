"""What the evaluation tasks share: items, the per-item run, and generation.

A task turns its source (HumanEval, reasoning-gym, MMLU, a jsonl file) into
items: the prompt the selector chooses the mask from, and a reference answer
(its NLL under the mask is measured for every task, and the oracle's mask is
chosen from it). For each item the runner selects, gathers, assigns the
submodel, then hands the item to the task's scorer; the task reduces the
per-item rows to metrics. lm-evaluation-harness tasks run whole cells their
own way (``harness.py``) and only share :class:`Progress` and the cell result.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import numpy as np

from ..engine.engine import Engine
from ..engine.stats import GenerationConfig, GenerationStats
from ..model.load import LoadedModel
from ..select.base import Selection
from .overlap import pack_mask
from .nll import response_nll
from .oracle import OracleSelector

MAX_REFERENCE_TOKENS = 384  # of a task's reference answer (a HumanEval solution fits)


@dataclass
class Item:
    id: str
    domain: str  # code, math, knowledge, or a data file's domain: masks are compared within and across these
    prompt: list[int]  # what the selector chooses from and the model answers
    reference: list[int]  # a reference answer: its NLL, and the oracle's mask
    data: dict = field(default_factory=dict)  # what the task's scorer needs


class Progress(Protocol):
    """Where a cell reports how far it got (a progress bar in the CLI)."""

    def start(self, label: str, total: Optional[int]) -> None: ...

    def total(self, total: int) -> None: ...

    def advance(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: Optional[int]) -> None:
        pass

    def total(self, total: int) -> None:
        pass

    def advance(self) -> None:
        pass


class ItemTask:
    """A task scored item by item; subclasses give ``items``, ``score`` and ``metrics``.

    ``reference_nll``: whether the runner measures the reference answer's NLL
    (MMLU reports the correct answer's NLL from its own scoring instead).
    """

    name = ""
    reference_nll = True

    def items(self, loaded: LoadedModel, limit: Optional[int]) -> list[Item]:
        raise NotImplementedError

    def prepare(self, loaded: LoadedModel, limit: Optional[int]) -> list[Item]:
        """What every cell of the task runs on (built once per run): its items."""
        return self.items(loaded, limit)

    def score(self, engine: Engine, item: Item, selection: Selection) -> dict:
        raise NotImplementedError

    def metrics(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    def run(self, engine: Engine, items: list[Item], progress: Progress) -> dict:
        """Every item under ``engine``'s selections: per-item rows and the task's metrics."""
        rows = []
        for item in items:
            rows.append(run_item(self, engine, item))
            progress.advance()
        return {"metrics": self.metrics(rows), "items": rows}


def run_item(task: ItemTask, engine: Engine, item: Item) -> dict:
    """Select the mask for one item, assign its submodel, score it; the row keeps the mask."""
    start = time.perf_counter()
    loaded = engine.loaded
    if isinstance(engine.selector, OracleSelector):
        engine.selector.reference = item.reference
    selection = engine.select(item.prompt)
    engine.use(selection)
    row = {"id": item.id, "domain": item.domain}
    if task.reference_nll:
        row["nll"] = response_nll(loaded, item.prompt, item.reference)
    row.update(task.score(engine, item, selection))
    row["mask"] = None if selection.indices is None else pack_mask(selection.indices, loaded.d_ff)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def generate(
    engine: Engine, prompt: list[int], selection: Selection, max_tokens: int, stop: Optional[Callable[[str], bool]] = None
) -> tuple[str, int]:
    """The greedy reply to ``prompt`` under ``selection`` and its token count; ``stop`` ends it early
    (a closed code block, a stated answer), which saves most of the time on a CPU."""
    stats = GenerationStats()
    text = ""
    stream = engine.generate(prompt, GenerationConfig(max_tokens=max_tokens, temp=0.0), stats, selection=selection)
    for piece in stream:
        text += piece
        if stop is not None and stop(text):
            stream.close()
            break
    return text, stats.generation_tokens


def mean(values: list) -> float:
    """The mean of the values given (NaN when there are none, e.g. a cell of zero items)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def reference_tokens(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode(text, add_special_tokens=False)[:MAX_REFERENCE_TOKENS]
