"""Conversations: one mask per conversation, and its KV cache carried across turns.

A conversation's mask is chosen from its first user turn (or from a task
instruction) and kept, so each new turn reuses the KV cache of the turns before
it and only the new tokens are processed. Asking to reselect chooses a new mask
from the latest user turn; the earlier turns are then processed again under the
new submodel.

Cached state is keyed by (selection, token prefix). The store is our own, not
mlx-lm's ``LRUPromptCache``: a lookup here spans every selection, because a
request that extends *any* cached conversation adopts that conversation's
mask, while mlx-lm's cache answers for one model key at a time. The KV
handling itself is mlx-lm's (``trim_prompt_cache``). The chat REPL and the
server both reply through :func:`reply`.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ..select.base import Selection
from .engine import Engine
from .prompts import chat_tokens
from .stats import GenerationConfig, GenerationStats


@dataclass
class Entry:
    selection: Selection
    tokens: list[int]  # exactly what ``cache`` holds
    cache: list
    nbytes: int


@dataclass
class Hit:
    selection: Selection
    cache: list
    cached: int  # leading tokens of the request already in ``cache``


class ConversationCache:
    """KV caches of conversations, least recently used first out, bounded in count and bytes."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 1 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def take(self, tokens: list[int], min_shared: int) -> Optional[Hit]:
        """The cached conversation that ``tokens`` extends (removed from the store:
        the caller extends it and stores it back), or None.

        An entry counts when it is a prefix of ``tokens``, or shares at least
        ``min_shared`` leading tokens with them (its cache is trimmed back to the
        shared part); the longest shared prefix wins. One token is always left to
        process, so the reply has logits to start from.
        """
        best, best_shared = None, 0
        for key, entry in self.entries.items():
            shared = _shared_prefix(entry.tokens, tokens)
            whole = shared == len(entry.tokens)
            if (whole or shared >= min_shared) and shared > best_shared:
                best, best_shared = key, shared
        if best is None:
            return None
        entry = self.entries.pop(best)
        keep = min(best_shared, len(tokens) - 1)
        if keep < len(entry.tokens):
            if not can_trim_prompt_cache(entry.cache):
                return None
            trim_prompt_cache(entry.cache, len(entry.tokens) - keep)
        return Hit(entry.selection, entry.cache, keep)

    def store(self, selection: Selection, tokens: list[int], cache: list) -> None:
        """Keep ``cache`` (holding ``tokens``) for the next turn; evict the oldest beyond the bounds."""
        nbytes = sum(c.nbytes for c in cache)
        if nbytes > self.max_bytes:
            return
        self.entries[self._next] = Entry(selection, tokens, cache, nbytes)
        self._next += 1
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(differ[0]) if len(differ) else n


def first_turn(messages: list[dict]) -> list[dict]:
    """The messages up to and including the first user turn (a mask is chosen from these)."""
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            return messages[: i + 1]
    return messages


def latest_turn(messages: list[dict]) -> list[dict]:
    """The system messages and the latest user turn (``reselect`` chooses from these)."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        return messages
    return [m for m in messages if m.get("role") == "system"] + [messages[users[-1]]]


def reply(
    engine: Engine,
    store: ConversationCache,
    messages: list[dict],
    config: GenerationConfig,
    stats: GenerationStats,
    reselect: bool = False,
    task: Optional[Selection] = None,
    chat_template: bool = True,
) -> Iterator[str]:
    """Stream the assistant's reply to ``messages``, reusing a cached conversation.

    The mask: the latest user turn's with ``reselect``; else ``task``'s; else the
    cached conversation's that these messages extend; else the first user
    turn's. Whatever the KV cache holds when the reply ends (or is stopped) is
    stored back for the next turn.
    """
    tokenizer = engine.loaded.tokenizer
    tokens = chat_tokens(tokenizer, messages, chat_template)
    opening = chat_tokens(tokenizer, first_turn(messages), chat_template)
    hit = None if reselect else store.take(tokens, len(opening))
    if hit is not None and _width(hit.selection, engine) != engine.k:
        hit = None  # asked for another size: a fresh mask (and KV)
    selection, select_from = None, None
    if reselect:
        select_from = chat_tokens(tokenizer, latest_turn(messages), chat_template)
    elif task is not None or hit is not None:
        selection = task if task is not None else hit.selection
    else:
        select_from = opening
    same = hit is not None and selection is not None and hit.selection.key == selection.key
    cache, cached = (hit.cache, hit.cached) if same else (None, 0)
    if selection is not None:
        selection = Selection(selection.indices)  # the mask only, not a selector's dense KV
    try:
        yield from engine.generate(tokens, config, stats, selection, cache, cached, select_from)
    finally:
        _store_back(store, stats, tokens)


def _width(selection: Selection, engine: Engine) -> int:
    return engine.loaded.d_ff if selection.indices is None else selection.indices.shape[1]


def _store_back(store: ConversationCache, stats: GenerationStats, prompt: list[int]) -> None:
    """Store what the KV cache holds: the prompt and the generated tokens it has seen."""
    cache = stats.cache
    if cache is None or stats.selection is None:
        return
    sequence = prompt + stats.token_ids
    held = cache[0].offset
    if held > len(sequence):  # the decode loop computes one token ahead
        if not can_trim_prompt_cache(cache):
            return
        trim_prompt_cache(cache, held - len(sequence))
        held = len(sequence)
    store.store(Selection(stats.selection.indices), sequence[:held], cache)
