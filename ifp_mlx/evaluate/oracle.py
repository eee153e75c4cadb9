"""The oracle: the mask the reference answer itself would choose (an upper bound, not a selector to ship).

It runs the activation statistic (GRIFFIN's, as the ``activations`` selector)
over prompt + reference answer with the prompt positions skipped, so only the
answer's tokens score the channels, and keeps the top k. No selector that sees
only the prompt can know the answer, so the gap between the oracle and a
selector is what better selection could still win.
"""

from typing import Optional

from ..errors import IFPError
from ..model.load import LoadedModel
from ..select.activations import ActivationScores
from ..select.base import DEFAULT_KEEP, Selection, resolve_k, top_k


class OracleSelector:
    """Implements the Selector protocol; the runner sets ``reference`` before each item."""

    name = "oracle"
    needs_dense = True
    adapter = None  # an upper bound of the selection alone: no LoRA weights

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.reference: Optional[list[int]] = None

    def default_k(self, d_ff: int) -> int:
        return resolve_k(d_ff, DEFAULT_KEEP)

    def select(self, tokens: list[int], k: int) -> Selection:
        if not self.reference:
            raise IFPError("the oracle selector needs a reference answer: it runs in `ifp eval` tasks only")
        scores = ActivationScores(self.loaded)
        scores.run(list(tokens) + list(self.reference), skip=len(tokens))
        return Selection(top_k(scores.sums, k))
