"""The one rule for which selector and which k: every command (generate, chat,
serve, masks, eval, bench) asks here, so their defaults cannot drift apart."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import IFPError
from ..model.load import LoadedModel
from .activations import ActivationSelector
from .base import Selector, resolve_k
from .basic import DenseSelector, RandomSelector
from .predictor import PredictorSelector, has_predictor
from .static import StaticSelector

SELECTORS = ("predictor", "activations", "static", "dense", "random")


@dataclass
class Choice:
    """A selector and the channels per layer it keeps (``requested_k``: what the
    user asked for before rounding up to a multiple of 8, if anything)."""

    selector: Selector
    k: int
    requested_k: Optional[int] = None


def default_selector(loaded: LoadedModel, mask: Optional[Path] = None, predictor: Optional[Path] = None) -> str:
    """The selector for pruning when none is named: a mask file's, else the trained
    predictor when the model has one (it beats the others and needs no dense
    prefill, see docs/PRUNING.md), else the activation statistic."""
    if mask is not None:
        return "static"
    return "predictor" if predictor is not None or has_predictor(loaded) else "activations"


def prunes(
    selector: Optional[str], keep: Optional[float] = None, k: Optional[int] = None,
    mask: Optional[Path] = None, predictor: Optional[Path] = None, prune: bool = False,
) -> bool:
    """Whether these options prune: a named selector but dense does; with none named,
    any pruning option (``keep``, ``k``, a mask, a predictor) or ``prune`` does."""
    if selector is not None:
        return selector != "dense"
    return prune or any(v is not None for v in (keep, k, mask, predictor))


def make_selector(
    name: str, loaded: LoadedModel, mask: Optional[Path] = None, seed: int = 0, predictor: Optional[Path] = None
) -> Selector:
    """Build a selector by name (the CLI's ``--selector``)."""
    if name == "predictor":
        return PredictorSelector.for_model(loaded, predictor)
    if name == "activations":
        return ActivationSelector(loaded)
    if name == "static":
        return StaticSelector(loaded, mask)
    if name == "dense":
        return DenseSelector()
    if name == "random":
        return RandomSelector(loaded, seed)
    raise IFPError(f"unknown selector {name!r}: choose one of {', '.join(SELECTORS)}")


def choose(
    loaded: LoadedModel,
    selector: Optional[str] = None,
    keep: Optional[float] = None,
    k: Optional[int] = None,
    mask: Optional[Path] = None,
    predictor: Optional[Path] = None,
    seed: int = 0,
    prune: bool = False,
) -> Choice:
    """The selector and k for the user's options.

    With no selector named, any pruning option (``keep``, ``k``, a mask, a
    predictor) or ``prune`` picks :func:`default_selector`; otherwise the model
    runs dense. With no size named, the selector's own default applies (a mask
    file's k, a predictor's keep, else half the channels).
    """
    if selector is None:
        selector = default_selector(loaded, mask, predictor) if prunes(None, keep, k, mask, predictor, prune) else "dense"
    if mask is not None and selector != "static":
        raise IFPError("--mask goes with --selector static")
    if predictor is not None and selector != "predictor":
        raise IFPError("--predictor goes with --selector predictor")
    if selector == "dense" and (keep not in (None, 1.0) or k not in (None, loaded.d_ff)):
        raise IFPError("--selector dense keeps every channel: drop --keep/--k, or choose a pruning selector")
    return sized(make_selector(selector, loaded, mask, seed, predictor), loaded.d_ff, keep, k)


def sized(selector: Selector, d_ff: int, keep: Optional[float] = None, k: Optional[int] = None) -> Choice:
    """``selector`` with the size the user named, else its own default size."""
    if keep is None and k is None:
        return Choice(selector, selector.default_k(d_ff))
    resolved = resolve_k(d_ff, keep, k)  # first: it refuses a keep of NaN or out of range in one line
    return Choice(selector, resolved, k if k is not None else round(keep * d_ff))
