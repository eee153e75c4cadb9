"""The benchmarks on tiny random models: well-formed results, no timing assertions."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.bench.ratios import (
    alternate,
    compact_vs_dense,
    gather_shares,
    mlx_lm_reference,
    random_tokens,
    run_engine,
)
from ifp_mlx.bench.report import render
from ifp_mlx.bench.shapes import SHAPES, Shape, check_build, shape_config, shape_model
from ifp_mlx.bench.settings import Row, Settings, check_selectors, check_settings, plan
from ifp_mlx.bench.suite import run_bench
from ifp_mlx.bench.traffic import non_ffn_bytes_per_token, traffic
from ifp_mlx.convert import ConvertOptions
from ifp_mlx.convert.random_model import build_random_model, random_llama_config
from ifp_mlx.engine.engine import Engine
from ifp_mlx.errors import IFPError
from ifp_mlx.model.load import load
from ifp_mlx.select.base import resolve_k
from ifp_mlx.select.choose import make_selector

HIDDEN, D_FF, LAYERS, VOCAB, KEEP = 64, 96, 2, 300, 0.5
IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]
TABLE_HEADERS = (
    "| test | prompt tok/s | gen tok/s | speed-up | ideal |",
    "| test | ttft | select | gather | prefill | first | select% |",
    "| test | k | active | MLX GB | RSS GB | read MB | read ms |",
)
TEST_KEYS = {
    "row", "kind", "selector", "keep", "low_memory", "prompt_tokens", "max_tokens", "k", "active_parameters",
    "total_parameters", "bytes_per_token", "ideal_speedup", "decode_speedup", "peak_memory_gb", "peak_rss_gb",
    "rss_at_start_gb", "mean", "std", "repetitions", "decode_speedup_per_round",
}
REPETITION_KEYS = {
    "prompt_tps", "engine_prompt_tps", "generation_tps", "generation_tokens", "time_to_first_token_s",
    "phases_s", "peak_memory_gb", "read_bytes", "read_seconds",
}


def ifp(*args: str) -> subprocess.CompletedProcess:
    """``ifp`` as a user runs it, stdout into a pipe and an 80-column terminal."""
    return subprocess.run([*IFP, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})


def squeeze(line: str) -> str:
    return " ".join(line.split())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random llama and a dense one of FFN width k = resolve_k(D_FF, KEEP)."""
    root = tmp_path_factory.mktemp("bench")
    k = resolve_k(D_FF, KEEP)
    full = build_random_model(root / "full", random_llama_config(HIDDEN, D_FF, LAYERS, VOCAB))
    dense = build_random_model(root / "dense", random_llama_config(HIDDEN, k, LAYERS, VOCAB), seed=1)
    return load(full), load(dense)


@pytest.fixture(scope="module")
def bench_run(models, tmp_path_factory):
    """One `ifp bench` on the tiny model: every kind of row, two prompt lengths."""
    out = tmp_path_factory.mktemp("bench-run")
    result = ifp(
        "bench", "-m", str(models[0].path), "-p", "6,10", "-n", "3", "-r", "2", "--keep", "1.0,0.5",
        "--selector", "activations,random", "--low-memory", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"),
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_bench_prints_the_tables_with_every_row(bench_run):
    result, _, _ = bench_run
    lines = [squeeze(line) for line in result.stdout.splitlines()]
    for p in (6, 10):
        assert f"**Prompt {p} tokens: speed**" in lines
    for header in TABLE_HEADERS:
        assert lines.count(header) == 2, header  # one per prompt length
    names = {line.split("|")[1].strip() for line in lines if line.startswith("| ") and not line.startswith("| test")}
    assert names == {"dense", "mlx-lm", "activations 0.5", "random 0.5", "activations 0.5 disk", "random 0.5 disk"}


def test_bench_output_fits_80_columns(bench_run):
    result, _, _ = bench_run
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_bench_json_schema(bench_run):
    _, results, plot = bench_run
    assert results["schema"] == "ifp-bench/1"
    assert {"settings", "machine", "model", "tests"} <= set(results)
    assert results["settings"]["prompt_tokens"] == [6, 10] and results["settings"]["repetitions"] == 2
    assert {"cpu", "cpu_count", "memory_bytes", "mlx", "mlx_lm", "peak_rss"} <= set(results["machine"])
    assert results["model"]["d_ff"] == D_FF and results["model"]["bytes_per_token"]["ffn_dense"] > 0
    assert len(results["tests"]) == 6 * 2
    for test in results["tests"]:
        assert TEST_KEYS <= set(test), test["row"]
        assert len(test["repetitions"]) == 2
        for rep in test["repetitions"]:
            assert REPETITION_KEYS <= set(rep)
            assert rep["generation_tokens"] == 3 and rep["prompt_tps"] > 0 and rep["generation_tps"] > 0
        assert test["mean"]["generation_tps"] > 0 and test["std"]["generation_tps"] >= 0
        assert test["peak_rss_gb"] > 0 and test["peak_memory_gb"] > 0
        assert test["decode_speedup"] > 0 and test["ideal_speedup"] >= 1
    by_row = {(t["row"], t["prompt_tokens"]): t for t in results["tests"]}
    dense, pruned = by_row["dense", 6], by_row["random 0.5 disk", 6]
    assert dense["decode_speedup"] == 1 and dense["ideal_speedup"] == 1 and dense["k"] == D_FF
    assert pruned["low_memory"] and pruned["k"] == resolve_k(D_FF, KEEP) and pruned["ideal_speedup"] > 1
    assert all(r["read_bytes"] > 0 for r in pruned["repetitions"]) and "read" in pruned["mean"]["phases_s"]
    assert set(by_row["activations 0.5", 10]["mean"]["phases_s"]) == {"select", "gather", "prefill", "first token"}
    assert 0 <= by_row["activations 0.5", 10]["mean"]["select_share"] <= 1
    reference = by_row["mlx-lm", 6]
    assert reference["kind"] == "mlx-lm" and reference["active_parameters"] == reference["total_parameters"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_worst_case_table_still_fits_80_columns(bench_run):
    """The longest row name and large figures, so real models fit too."""
    _, results, _ = bench_run
    for test in results["tests"]:
        test["row"] = "activations 0.33 disk"
        test["k"], test["active_parameters"] = 14336, 7_500_000_000
        test["peak_memory_gb"] = test["peak_rss_gb"] = 123.45
        test["mean"].update(prompt_tps=12345.6, generation_tps=3.21, time_to_first_token_s=123.456, read_bytes=9.9e9, read_seconds=99.9)
        test["std"].update(prompt_tps=1234.5, generation_tps=1.23)
        test["mean"]["phases_s"] = dict.fromkeys(("select", "read", "prefill", "first token"), 99.999)
    assert max(len(line) for line in render(results).splitlines()) <= 80


def test_alternated_rows_leave_memory_out(models):
    settings = Settings(prompt_tokens=(5,), max_tokens=2, repetitions=1, keeps=(0.5,), selectors=("random",), alternate=True)
    results = run_bench(models[0].path, settings)
    assert [t["row"] for t in results["tests"]] == ["dense", "mlx-lm", "random 0.5"]
    assert all(t["peak_rss_gb"] is None and len(t["repetitions"]) == 1 for t in results["tests"])
    assert "--alternate" in render(results)


def test_plan_maps_keep_one_to_the_dense_row():
    settings = Settings(keeps=(1.0, 0.5, 0.33), low_memory=True)
    names = [r.name for r in plan(settings, ("predictor", "activations"))]
    assert names == [
        "dense", "mlx-lm", "predictor 0.5", "activations 0.5", "predictor 0.33", "activations 0.33",
        "predictor 0.5 disk", "activations 0.5 disk", "predictor 0.33 disk", "activations 0.33 disk",
    ]
    assert [r.name for r in plan(Settings(keeps=(1.0,), reference=False), ("random",))] == ["dense"]
    assert Row("pruned", "random", 0.25, True).name == "random 0.25 disk"


@pytest.mark.parametrize(
    "settings, message",
    [
        (Settings(keeps=(0.0,)), "--keep must be in (0, 1]"),
        (Settings(keeps=(1.5,)), "--keep must be in (0, 1]"),
        (Settings(repetitions=0), "-r must be at least 1"),
        (Settings(max_tokens=0), "-n must be at least 1"),
        (Settings(prompt_tokens=(0,)), "-p must list"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(IFPError, match=message.replace("(", r"\(").replace("]", r"\]")):
        check_settings(settings)


def test_only_pruning_selectors_are_named():
    check_selectors(("predictor", "activations", "static", "random"))
    with pytest.raises(IFPError, match="unknown selector 'nope': choose from predictor, activations"):
        check_selectors(("nope",))
    with pytest.raises(IFPError, match="the dense row is always run"):
        check_selectors(("dense",))


def assert_one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_bad_input_is_one_line(models):
    model = str(models[0].path)
    assert_one_line_error(ifp("bench", "-m", model, "--keep", "0"), "--keep must be in (0, 1], got 0")
    assert_one_line_error(ifp("bench", "-m", model, "-r", "0"), "-r must be at least 1")
    assert_one_line_error(ifp("bench", "-m", model, "--selector", "nope"), "unknown selector 'nope'")
    assert_one_line_error(ifp("bench", "--shape", "llama-70b"), "unknown shape 'llama-70b'")
    assert_one_line_error(ifp("bench", "-m", model, "--keep", "half"), "--keep: half is not a list of numbers")


def test_what_the_model_cannot_run_is_refused_before_any_test(models):
    path = models[0].path
    with pytest.raises(IFPError, match="has no predictor"):
        run_bench(path, Settings(selectors=("predictor",)))
    with pytest.raises(IFPError, match="over the model's context of 4096"):
        run_bench(path, Settings(prompt_tokens=(4000,), max_tokens=128))
    with pytest.raises(IFPError, match="--bits must be one of"):
        check_build("float32", 7)
    with pytest.raises(IFPError, match="--dtype must be one of"):
        check_build("float64", None)


def test_compare_gather_keeps_the_ratio_tool():
    result = ifp("bench", "--compare", "gather", "--hidden", "64", "--d-ff", "128", "--layers", "2", "--vocab", "300", "-p", "8", "-r", "1", "--keep", "0.5")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["keeps"][0]
    assert figures["k"] == 64 and 0 < figures["gather"]["random"]["gather_share"] < 1


def test_the_reference_computes_what_ifp_computes(models):
    loaded = models[0]
    tokens = mx.array(random_tokens(7, VOCAB))[None]
    loaded.assign(loaded.dense_ffn())
    ours, theirs = loaded.model(tokens), mlx_lm_reference(loaded)(tokens)
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4)


def test_the_quantized_reference_requantizes_only_down(tmp_path):
    """Gate and up keep their quantized words; down is quantized again along d_ff."""
    options = ConvertOptions(dtype="float32", quantize=True, bits=4, group_size=64)
    loaded = load(build_random_model(tmp_path / "q4", random_llama_config(64, 128, 2, VOCAB), options=options))
    reference = mlx_lm_reference(loaded)
    mlp, bank = reference.model.layers[1].mlp, loaded.layer_bank(1)
    assert mx.array_equal(mlp.gate_proj.weight, bank.weight[0, :, 0]) and mlp.down_proj.weight.shape == (64, 128 * 4 // 32)
    tokens = mx.array(random_tokens(7, VOCAB))[None]
    ours, theirs = np.array(loaded.model(tokens)), np.array(reference(tokens))
    assert np.abs(ours - theirs).max() < 0.1 * np.abs(ours).max()


def test_ideal_speedup_from_bytes_per_token(models, tmp_path):
    loaded = models[0]
    costs = traffic(loaded)
    k = resolve_k(D_FF, KEEP)
    assert costs.ideal_speedup(D_FF) == 1
    expected = (costs.non_ffn + costs.ffn_dense) / (costs.non_ffn + costs.ffn_dense * k / D_FF)
    assert costs.ideal_speedup(k) == pytest.approx(expected)
    assert costs.ffn_dense == 3 * HIDDEN * D_FF * LAYERS * 4  # float32, every channel's three rows
    # untied: the lookup reads one row, so the embedding table is not counted; the output layer is
    untied = load(build_random_model(tmp_path / "untied", {**random_llama_config(HIDDEN, D_FF, LAYERS, VOCAB), "tie_word_embeddings": False}))
    assert non_ffn_bytes_per_token(untied) == non_ffn_bytes_per_token(loaded)


def test_shapes_have_the_real_sizes(monkeypatch, tmp_path):
    sizes = {name: (s.hidden, s.d_ff, s.layers, s.heads, s.kv_heads) for name, s in SHAPES.items()}
    assert sizes == {
        "llama-1b": (2048, 8192, 16, 32, 8), "llama-3b": (3072, 8192, 28, 24, 8),
        "llama-8b": (4096, 14336, 32, 32, 8), "qwen2.5-1.5b": (1536, 8960, 28, 12, 2),
    }
    config = shape_config("qwen2.5-1.5b", layers=3)
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("qwen2", 3, 32768)
    with pytest.raises(IFPError, match="unknown shape"):
        shape_config("llama-70b")
    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 64, 128, 2, 4, 2, 16, 1000, True, 10000.0))
    with shape_model("tiny", bits=8, vocab=512, cache=tmp_path) as path:
        loaded = load(path)
        assert loaded.config["quantization"]["bits"] == 8 and loaded.d_ff == 128
    assert path == tmp_path / "tiny-L2-v512-float32-q8" and (path / "config.json").exists()


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
