"""Conversations: the mask kept across turns, KV reuse that changes nothing, the bounded store."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from ifp_mlx.engine.conversation import ConversationCache, first_turn, latest_turn, reply
from ifp_mlx.engine.engine import Engine
from ifp_mlx.engine.prompts import chat_tokens
from ifp_mlx.engine.stats import GenerationConfig, GenerationStats
from ifp_mlx.select.base import Selection
from ifp_mlx.select.choose import choose

CONFIG = GenerationConfig(max_tokens=10)


@pytest.fixture
def engine(smollm2):
    return Engine.for_choice(smollm2, choose(smollm2, "activations", keep=0.5))


def turn(engine, store, messages, **options):
    stats = GenerationStats()
    text = "".join(reply(engine, store, messages, CONFIG, stats, **options))
    return text, stats


def test_second_turn_reuses_the_first_turns_kv_and_mask_and_changes_nothing(engine):
    store = ConversationCache()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first, stats1 = turn(engine, store, messages)
    assert stats1.cached_tokens == 0
    mask = stats1.selection.indices
    opening = chat_tokens(engine.loaded.tokenizer, messages)
    assert mx.array_equal(mask, engine.select(opening).indices)  # chosen from the first user turn
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the capital of Spain?"}]
    second, stats2 = turn(engine, store, messages)
    assert stats2.cached_tokens > stats1.prompt_tokens  # the first turn and its reply came from the cache
    assert mx.array_equal(stats2.selection.indices, mask)  # the conversation keeps its mask
    # the same reply as processing the whole conversation afresh under that mask
    fresh = GenerationStats()
    tokens = chat_tokens(engine.loaded.tokenizer, messages)
    again = "".join(engine.generate(tokens, CONFIG, fresh, Selection(mask)))
    assert fresh.cached_tokens == 0 and again == second


def test_reselect_chooses_from_the_latest_turn_and_reprocesses(engine):
    store = ConversationCache()
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    text, _ = turn(engine, store, messages)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Now solve 12 * 7."}]
    _, stats = turn(engine, store, messages, reselect=True)
    assert stats.cached_tokens == 0
    latest = chat_tokens(engine.loaded.tokenizer, latest_turn(messages))
    assert mx.array_equal(stats.selection.indices, engine.select(latest).indices)


def test_a_stopped_reply_leaves_a_consistent_cache(engine):
    store = ConversationCache()
    messages = [{"role": "user", "content": "Count from one to twenty."}]
    stats = GenerationStats()
    stream = reply(engine, store, messages, GenerationConfig(max_tokens=50), stats)
    partial = "".join(next(stream) for _ in range(4))
    stream.close()  # Ctrl+C, or a client that went away
    assert len(store.entries) == 1
    entry = next(iter(store.entries.values()))
    assert entry.cache[0].offset == len(entry.tokens)
    messages += [{"role": "assistant", "content": partial}, {"role": "user", "content": "Go on."}]
    cached_reply, stats2 = turn(engine, store, messages)
    assert stats2.cached_tokens > 0
    fresh = "".join(engine.generate(chat_tokens(engine.loaded.tokenizer, messages), CONFIG, GenerationStats(), Selection(stats2.selection.indices)))
    assert cached_reply == fresh


def test_another_size_gets_a_fresh_mask(smollm2):
    store = ConversationCache()
    messages = [{"role": "user", "content": "Hello!"}]
    half = Engine.for_choice(smollm2, choose(smollm2, "activations", keep=0.5))
    text, _ = turn(half, store, messages)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Again?"}]
    quarter = Engine.for_choice(smollm2, choose(smollm2, "activations", keep=0.25))
    _, stats = turn(quarter, store, messages)
    assert stats.cached_tokens == 0 and stats.selection.indices.shape[1] == quarter.k


def test_store_is_bounded_and_trims_to_the_shared_prefix(smollm2):
    def kv(n):
        cache = make_prompt_cache(smollm2.model)
        smollm2.model(mx.array([list(range(1, n + 1))]), cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    store = ConversationCache(max_entries=2)
    for n in (4, 5, 6):
        store.store(Selection(None), list(range(1, n + 1)), kv(n))
    assert [len(e.tokens) for e in store.entries.values()] == [5, 6]  # the oldest went first
    hit = store.take([1, 2, 3, 9, 9], min_shared=3)  # shares 3 tokens with the 6-token entry
    assert hit.cached == 3 and hit.cache[0].offset == 3
    assert store.take([7, 7], min_shared=1) is None
    one = sum(c.nbytes for c in kv(6))
    small = ConversationCache(max_bytes=one + 1)
    small.store(Selection(None), list(range(1, 7)), kv(6))
    small.store(Selection(None), list(range(1, 6)), kv(5))
    assert len(small.entries) == 1 and small.nbytes <= one + 1


def test_turn_helpers():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert first_turn(messages) == messages[:2]
    assert latest_turn(messages) == [messages[0], messages[3]]
