"""What ``ifp bench`` measures, checked before anything heavy is imported.

This module imports nothing of MLX, so bad input is refused at once (the
selector names are the one exception: they come from ``select.choose``).
"""

import math
from dataclasses import dataclass
from typing import Optional

from ..errors import IFPError


@dataclass
class Settings:
    """What ``ifp bench`` measures; empty ``selectors``: the model's default selector."""

    prompt_tokens: tuple[int, ...] = (512,)
    max_tokens: int = 128
    repetitions: int = 5
    keeps: tuple[float, ...] = (0.5,)
    selectors: tuple[str, ...] = ()
    low_memory: bool = False
    reference: bool = True
    cold: bool = False  # --low-memory rows: evict the bank from the page cache before each reply
    alternate: bool = False  # all rows held at once, one reply each per round (no memory figures)


@dataclass(frozen=True)
class Row:
    """One configuration: ``kind`` is dense, mlx-lm or pruned."""

    kind: str
    selector: Optional[str] = None
    keep: float = 1.0
    low_memory: bool = False

    @property
    def name(self) -> str:
        if self.kind != "pruned":
            return self.kind
        return f"{self.selector} {self.keep:g}" + (" disk" if self.low_memory else "")


def check_settings(settings: Settings) -> None:
    """Refuse bad input in one line, before anything is loaded."""
    if not settings.prompt_tokens or min(settings.prompt_tokens) < 1:
        raise IFPError(f"-p must list prompt lengths of at least 1 token (got {list(settings.prompt_tokens)})")
    if settings.max_tokens < 1:
        raise IFPError(f"-n must be at least 1 (got {settings.max_tokens})")
    if settings.repetitions < 1:
        raise IFPError(f"-r must be at least 1 (got {settings.repetitions})")
    for keep in settings.keeps:
        if not (math.isfinite(keep) and 0 < keep <= 1):
            raise IFPError(f"--keep must be in (0, 1], got {keep:g}")


def check_selectors(selectors: tuple[str, ...]) -> None:
    """Pruning selectors only (the dense row is always there)."""
    from ..select.choose import SELECTORS

    for name in selectors:
        if name == "dense":
            raise IFPError("--selector dense: the dense row is always run; name pruning selectors")
        if name not in SELECTORS:
            pruning = ", ".join(s for s in SELECTORS if s != "dense")
            raise IFPError(f"unknown selector {name!r}: choose from {pruning}")


def plan(settings: Settings, selectors: tuple[str, ...]) -> list[Row]:
    """The rows: dense, the mlx-lm reference, then each keep below 1 x selector,
    in memory and (with ``low_memory``) on disk. Keep 1.0 prunes nothing: it is the dense row."""
    keeps = [k for k in dict.fromkeys(settings.keeps) if k < 1]
    rows = [Row("dense")] + ([Row("mlx-lm")] if settings.reference else [])
    modes = (False, True) if settings.low_memory else (False,)
    rows += [Row("pruned", s, k, lm) for lm in modes for k in keeps for s in selectors]
    return rows
