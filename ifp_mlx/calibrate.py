"""Static masks: one selection for every prompt, calibrated on text.

The score is the activation statistic of the ``activations`` selector summed
over a calibration set (FINDINGS.md: calibrated on activations, a static mask
is far better than one from weight norms, which is no better than random).
Without calibration text, weight norms are the fallback.
"""

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx

from .errors import IFPError
from .load import LoadedModel
from .selectors import ActivationScores, top_k, weight_norm_scores

CHUNK_TOKENS = 512


def read_texts(paths: Iterable[Path]) -> list[str]:
    """Plain text files as is; jsonl files by their text/prompt/response fields."""
    texts = []
    for path in paths:
        if not path.is_file():
            raise IFPError(f"{path}: calibration file not found")
        if path.suffix == ".jsonl":
            texts += _jsonl_texts(path)
        else:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return [t for t in texts if t.strip()]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise IFPError(f"{path}:{number}: not valid JSON")
        parts = [item.get(key) for key in ("text", "prompt", "response") if isinstance(item.get(key), str)]
        if not parts:
            raise IFPError(f"{path}:{number}: no text, prompt or response field")
        texts.append("\n".join(parts))
    return texts


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
