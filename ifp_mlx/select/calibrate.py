"""Static masks: one selection for every prompt, calibrated on text.

The score is the activation statistic of the ``activations`` selector summed
over a calibration set. Measured on SmolLM2 at keep 0.5 (docs/PRUNING.md), a
mask calibrated on activations is far better than one from weight norms, which
is no better than random channels: so there is no weight-norm fallback. Without
the user's text, the built-in calibration text shipped with the package
(``calibration.txt``: short chat exchanges over code, math, knowledge, writing
and instructions, run through the model's chat template) is used, and its
scores are cached per model under ``$IFP_HOME/calibration``.
"""

import hashlib
import itertools
import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx

from ..data.records import read_records
from ..errors import IFPError
from ..files import atomic_file, ifp_home
from ..model.load import LoadedModel
from ..model.masks import model_fingerprint
from .activations import ActivationScores
from .base import top_k

BUILTIN_TEXT = "calibration.txt"
EXCHANGE = re.compile(r"<\|user\|>(.*?)<\|assistant\|>(.*?)(?=<\|user\|>|\Z)", re.S)

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
    """Indices ``[L, k]`` from activations summed over ``texts`` (the built-in text if none)."""
    if not texts:
        return top_k(builtin_scores(loaded, progress), k)
    return top_k(activation_sums(loaded, _chunks(loaded.tokenizer.encode, texts, max_tokens), progress), k)


def activation_sums(
    loaded: LoadedModel, chunks: list[list[int]], progress: Optional[Callable[[int, int], None]] = None
) -> mx.array:
    """The activation statistic ``[L, d_ff]`` summed over token chunks."""
    scores = ActivationScores(loaded)
    total = sum(len(c) for c in chunks)
    for chunk in chunks:
        scores.run(chunk)
        if progress:
            progress(scores.tokens, total)
    return scores.sums


def builtin_scores(loaded: LoadedModel, progress: Optional[Callable[[int, int], None]] = None) -> mx.array:
    """Scores from the built-in calibration text, computed once per model and cached."""
    path = _builtin_cache(loaded)
    if path.is_file():
        try:
            return mx.load(str(path))["scores"]
        except (ValueError, RuntimeError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache is recomputed, never trusted
    sums = activation_sums(loaded, builtin_chunks(loaded), progress)
    mx.eval(sums)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), {"scores": sums})
    return sums


def builtin_chunks(loaded: LoadedModel) -> list[list[int]]:
    """The built-in exchanges as tokens, each through the model's chat template."""
    text = _builtin_text()
    tokenizer = loaded.tokenizer
    chunks = []
    for user, assistant in EXCHANGE.findall(text):
        if tokenizer.chat_template is None:
            chunks.append(tokenizer.encode(f"{user.strip()}\n\n{assistant.strip()}"))
            continue
        messages = [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": assistant.strip()}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        chunks.append(tokenizer.encode(rendered, add_special_tokens=False)[:CHUNK_TOKENS])
    return chunks


def _builtin_cache(loaded: LoadedModel) -> Path:
    """One cache file per model (its fingerprint) and per version of the built-in text."""
    key = json.dumps(model_fingerprint(loaded.config), sort_keys=True).encode() + _builtin_text().encode("utf-8")
    return ifp_home() / "calibration" / f"{hashlib.sha256(key).hexdigest()[:20]}.safetensors"


@cache
def _builtin_text() -> str:
    """The built-in calibration text (read once: the cache key and the chunks both need it)."""
    return resources.files(__package__).joinpath(BUILTIN_TEXT).read_text(encoding="utf-8")


def _chunks(encode: Callable[[str], list[int]], texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token chunks of at most CHUNK_TOKENS, up to ``max_tokens`` in all."""
    chunks, budget = [], max_tokens
    for text in texts:
        ids = encode(text, add_special_tokens=False)
        for start in range(0, len(ids), CHUNK_TOKENS):
            chunk = ids[start : start + CHUNK_TOKENS][:budget]
            if chunk:
                chunks.append(chunk)
                budget -= len(chunk)
            if budget <= 0:
                return chunks
    return chunks
