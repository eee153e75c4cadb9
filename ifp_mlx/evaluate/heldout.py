"""Response NLL on held-out jsonl files (the data format's prompt/response pairs), per domain."""

from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..engine.engine import Engine
from ..model.load import LoadedModel
from ..select.base import Selection
from .nll import example_tokens, read_examples
from .tasks import Item, ItemTask, mean


class HeldoutTask(ItemTask):
    """Every record of the files, ``limit`` per domain; the runner measures each response's NLL."""

    name = "nll"

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)

    def items(self, loaded: LoadedModel, limit: Optional[int]) -> list[Item]:
        return [Item(e.id, e.domain, *example_tokens(loaded, e)) for e in read_examples(self.paths, limit)]

    def score(self, engine: Engine, item: Item, selection: Selection) -> dict:
        return {}

    def metrics(self, rows: list[dict]) -> dict:
        domains = defaultdict(list)
        for row in rows:
            domains[row["domain"]].append(row["nll"])
        return {"nll": mean([r["nll"] for r in rows]), "n": len(rows), "domains": {d: mean(v) for d, v in sorted(domains.items())}}
