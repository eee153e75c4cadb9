"""Masks in the results file, and how much they overlap within and across domains.

A mask ``[L, k]`` is stored as one bit per channel (packed, base64): 5.6 KB
for SmolLM2 instead of 90 KB of numbers, so the results file keeps every
item's mask and the overlap figures can be redrawn from it at any time.
Overlap is ``mask_overlap`` (|A ∩ B| / k) layer by layer, averaged over pairs
of items; two masks of one item (an MMLU question at 0 and 5 shots) are not a
pair. Near 1 across unrelated domains means the masks do not depend on the
prompt (a static mask, or a collapsed predictor).
"""

import base64
import itertools
from typing import Iterable

import numpy as np

from ..model.masks import mask_overlap

MAX_MASKS_PER_DOMAIN = 32  # pairs grow with the square: the first 32 of a domain are enough for a mean


def pack_mask(indices, d_ff: int) -> str:
    """Selected channels ``[L, k]`` as base64 of one bit per channel, layer by layer."""
    picked = np.array(indices).astype(np.int64)
    bits = np.zeros((picked.shape[0], d_ff), dtype=bool)
    np.put_along_axis(bits, picked, True, axis=1)
    return base64.b64encode(np.packbits(bits, axis=1).tobytes()).decode("ascii")


def unpack_mask(text: str, num_layers: int, d_ff: int) -> np.ndarray:
    """The ``[L, k]`` ascending channel numbers of a packed mask."""
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(num_layers, -1)
    bits = np.unpackbits(raw, axis=1, count=d_ff).astype(bool)
    return np.nonzero(bits)[1].reshape(num_layers, -1).astype(np.uint32)


def layer_overlaps(masks: Iterable[tuple[str, str, np.ndarray]], d_ff: int) -> dict[tuple[str, str], tuple[np.ndarray, int]]:
    """Per domain pair (``(a, a)`` within, ``(a, b)`` across, sorted): mean overlap per layer and the pair count.

    ``masks``: (domain, item id, ``[L, k]``) triples.
    """
    kept, seen = [], {}
    for domain, item_id, mask in masks:
        if seen.get(domain, 0) < MAX_MASKS_PER_DOMAIN:
            seen[domain] = seen.get(domain, 0) + 1
            kept.append((domain, item_id, mask))
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[tuple[str, str], int] = {}
    for (da, ia, a), (db, ib, b) in itertools.combinations(kept, 2):
        if ia == ib:
            continue
        key = tuple(sorted((da, db)))
        per_layer = np.array([mask_overlap(a[i : i + 1], b[i : i + 1], d_ff) for i in range(a.shape[0])])
        sums[key] = sums.get(key, 0) + per_layer
        counts[key] = counts.get(key, 0) + 1
    return {key: (sums[key] / counts[key], counts[key]) for key in sorted(sums)}


def within_across(overlaps: dict[tuple[str, str], tuple[np.ndarray, int]]) -> tuple[float, float]:
    """Mean overlap over all pairs inside one domain, and over all pairs of two domains (NaN: no such pair)."""
    totals = {True: [0.0, 0], False: [0.0, 0]}
    for (a, b), (per_layer, count) in overlaps.items():
        total = totals[a == b]
        total[0] += float(per_layer.mean()) * count
        total[1] += count
    return tuple(s / n if n else float("nan") for s, n in (totals[True], totals[False]))
