"""Static masks: one selection for every prompt, calibrated on text.

The score is the activation statistic of the ``activations`` selector summed
over a calibration set (FINDINGS.md: calibrated on activations, a static mask
is far better than one from weight norms, which is no better than random).
Without calibration text, weight norms are the fallback.
"""

import itertools
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx

from ..data.records import read_records
from ..errors import IFPError
from ..model.load import LoadedModel
from .activations import ActivationScores
from .base import top_k
from .static import weight_norm_scores

CHUNK_TOKENS = 512


def read_texts(paths: Iterable[Path]) -> list[str]:
    """Plain text files as is; jsonl files by their text/prompt/response fields.

    Texts are interleaved across files (first of each, second of each, ...) so
    a token budget samples every file, not just the first.
    """
    per_file = []
    for path in paths:
        if not path.is_file():
            raise IFPError(f"{path}: calibration file not found")
        if path.suffix == ".jsonl":
            per_file.append(_jsonl_texts(path))
        else:
            per_file.append([path.read_text(encoding="utf-8", errors="replace")])
    interleaved = [t for group in itertools.zip_longest(*per_file) for t in group if t is not None]
    return [t for t in interleaved if t.strip()]


def _jsonl_texts(path: Path) -> list[str]:
    """The text (prose) or prompt and response (pairs) of each record."""
    return ["\n".join(r[key] for key in ("text", "prompt", "response") if key in r) for r in read_records(path)]


def calibrate(
    loaded: LoadedModel,
    texts: list[str],
    k: int,
    max_tokens: int = 16384,
    progress: Optional[Callable[[int, int], None]] = None,
) -> mx.array:
    """Indices ``[L, k]`` from activations summed over ``texts`` (weight norms if none)."""
    if not texts:
        return top_k(weight_norm_scores(loaded), k)
    chunks = _chunks(loaded, texts, max_tokens)
    scores = ActivationScores(loaded)
    total = sum(len(c) for c in chunks)
    for chunk in chunks:
        scores.run(chunk)
        if progress:
            progress(scores.tokens, total)
    return top_k(scores.sums, k)


def _chunks(loaded: LoadedModel, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token chunks of at most CHUNK_TOKENS, up to ``max_tokens`` in all."""
    chunks, budget = [], max_tokens
    for text in texts:
        ids = loaded.tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), CHUNK_TOKENS):
            chunk = ids[start : start + CHUNK_TOKENS][:budget]
            if chunk:
                chunks.append(chunk)
                budget -= len(chunk)
            if budget <= 0:
                return chunks
    return chunks
