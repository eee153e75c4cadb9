"""The benchmark helpers on tiny shapes: well-formed results, no timing assertions."""

import json

import mlx.core as mx
import pytest
from ifp_mlx.convert.random_model import build_random_model, random_llama_config

from ifp_mlx.bench.ratios import (
    alternate,
    compact_vs_dense,
    gather_shares,
    random_tokens,
    run_engine,
)
from ifp_mlx.engine.engine import Engine
from ifp_mlx.model.load import load
from ifp_mlx.select.base import resolve_k
from ifp_mlx.select.choose import make_selector

HIDDEN, D_FF, LAYERS, VOCAB, KEEP = 64, 96, 2, 300, 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random llama and a dense one of FFN width k = resolve_k(D_FF, KEEP)."""
    root = tmp_path_factory.mktemp("bench")
    k = resolve_k(D_FF, KEEP)
    full = build_random_model(root / "full", random_llama_config(HIDDEN, D_FF, LAYERS, VOCAB))
    dense = build_random_model(root / "dense", random_llama_config(HIDDEN, k, LAYERS, VOCAB), seed=1)
    return load(full), load(dense)


def test_random_model_has_the_asked_shapes(models):
    loaded, dense_k = models
    assert (loaded.d_ff, loaded.num_layers) == (D_FF, LAYERS)
    assert dense_k.d_ff == resolve_k(D_FF, KEEP)
    assert loaded.ifp["dtype"] == "float32" and loaded.ifp["bank"]["hidden_size"] == HIDDEN
    assert loaded.config.get("eos_token_id") is None and not loaded.tokenizer.eos_token_ids
    logits = loaded.model(mx.array(random_tokens(5, VOCAB))[None])
    assert logits.shape == (1, 5, VOCAB)


def test_alternate_warms_up_then_interleaves_both_ways():
    calls = []
    results = alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, rounds=2)
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert results == {"a": [1, 1], "b": [2, 2]}


def test_compact_vs_dense_is_well_formed(models):
    loaded, dense_k = models
    result = compact_vs_dense(loaded, dense_k, KEEP, random_tokens(6, VOCAB), max_tokens=3, rounds=1)
    assert result["k"] == dense_k.d_ff
    assert set(result["generation_tps"]) == {"compact", "dense_k_ifp", "dense_k_mlx_lm"}
    assert all(v > 0 for v in result["generation_tps"].values())
    assert result["ratio_vs_dense_k_ifp"] > 0 and result["ratio_vs_dense_k_mlx_lm"] > 0
    json.dumps(result)


def test_compact_vs_dense_refuses_a_dense_model_of_another_width(models):
    loaded, _ = models
    with pytest.raises(ValueError, match="FFN width"):
        compact_vs_dense(loaded, loaded, KEEP, random_tokens(4, VOCAB), max_tokens=2, rounds=1)


def test_gather_shares_gather_on_every_run(models):
    loaded, _ = models
    result = gather_shares(loaded, KEEP, random_tokens(20, VOCAB), rounds=2)
    for name, figures in result.items():
        assert figures["gathers"] == 3, name  # the warm-up and both rounds
        assert 0 < figures["gather_share"] < 1
        assert set(figures["phases_ms"]) == {"select", "gather", "prefill", "first token"}


def test_a_timed_reply_is_never_cut_short(models):
    """No EOS in the random model: every run decodes exactly max_tokens."""
    loaded, _ = models
    engine = Engine.create(loaded, make_selector("random", loaded), keep=KEEP)
    stats = run_engine(engine, random_tokens(6, VOCAB), max_tokens=4)
    assert stats.generation_tokens == 4 and stats.submodel.k == resolve_k(D_FF, KEEP)
