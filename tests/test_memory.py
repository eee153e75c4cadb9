"""Memory modes: the bank on disk (--low-memory), dense passes from the bank, the fit check."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert import ConvertOptions, convert
from tiny import write_hf_folder

from ifp_mlx.engine.engine import Engine
from ifp_mlx.engine.memory import need, parse_bytes
from ifp_mlx.engine.prompts import prompt_tokens
from ifp_mlx.engine.stats import GenerationConfig, GenerationStats
from ifp_mlx.errors import IFPError
from ifp_mlx.model.bank import gather_rows
from ifp_mlx.model.load import load
from ifp_mlx.select.choose import choose

IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]
BANKS = {
    "float32": ConvertOptions(dtype="float32"),
    "bfloat16": ConvertOptions(dtype="bfloat16"),
    "float16": ConvertOptions(dtype="float16"),
    "q4": ConvertOptions(dtype="float32", quantize=True, bits=4, group_size=32),
    "q8": ConvertOptions(dtype="float32", quantize=True, bits=8, group_size=32),
}


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("banks")
    write_hf_folder(root / "hf", "qwen2")
    for name, options in BANKS.items():
        convert(root / "hf", root / name, options)
    return root


def some_indices(loaded, k: int, seed: int = 0) -> mx.array:
    """Sorted random channels with runs of adjacent ones (the reader merges runs)."""
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(loaded.d_ff, k, replace=False)) for _ in range(loaded.num_layers)]
    rows[0][: k // 2] = np.arange(k // 2)  # one long run
    return mx.array(np.sort(np.stack(rows), axis=-1).astype(np.uint32))


@pytest.mark.parametrize("bank", list(BANKS))
def test_reading_from_disk_equals_gathering_from_memory(banks, bank):
    resident = load(banks / bank, dense=False)
    on_disk = load(banks / bank, dense=False, low_memory=True)
    indices = some_indices(resident, 40)
    expected = gather_rows(resident.bank(), indices)
    read, stats = on_disk.bank_file().gather(indices)
    assert read.bits == expected.bits and read.k == 40
    for field in ("gate_up", "down_t", "gate_up_scales", "gate_up_biases", "down_t_scales", "down_t_biases"):
        want = getattr(expected, field)
        if want is None:
            assert getattr(read, field) is None
            continue
        got = getattr(read, field)
        assert len(got) == resident.num_layers
        for layer in range(resident.num_layers):
            assert got[layer].dtype == want.dtype
            assert mx.array_equal(got[layer], want[layer]), (field, layer)
    bank_bytes = on_disk.bank_file().nbytes
    assert stats.bytes == bank_bytes * 40 // resident.d_ff  # only the selected records
    assert stats.reads < resident.num_layers * 40 * (3 if expected.bits else 1)  # runs, not channels


@pytest.mark.parametrize("bank", ["float32", "q4"])
def test_low_memory_replies_token_for_token_like_resident(banks, bank):
    tokens = list(range(3, 40, 3))
    replies = []
    for low_memory in (False, True):
        loaded = load(banks / bank, dense=False, low_memory=low_memory)
        for selector in ("activations", "random"):
            engine = Engine.for_choice(loaded, choose(loaded, selector, keep=0.5))
            engine.warm_up()
            stats = GenerationStats()
            replies.append("".join(engine.generate(tokens, GenerationConfig(max_tokens=8), stats)))
            assert (stats.read is not None) == low_memory
            assert ("read" in stats.phases) == low_memory and ("gather" in stats.phases) != low_memory
        assert loaded.dense is None  # no dense copy in any pruned mode
        assert (loaded.resident_bank is None) == low_memory
    assert replies[:2] == replies[2:]


def test_smollm2_low_memory_matches_resident(smollm2_dir):
    """The real model, every default: the shipped predictor and activations."""
    outputs = []
    for low_memory in (False, True):
        loaded = load(smollm2_dir, dense=False, low_memory=low_memory)
        tokens = prompt_tokens(loaded.tokenizer, "Write a Python function that reverses a string.")
        for selector in ("predictor", "activations"):
            engine = Engine.for_choice(loaded, choose(loaded, selector, keep=0.5))
            stats = GenerationStats()
            outputs.append("".join(engine.generate(tokens, GenerationConfig(max_tokens=10), stats)))
        if low_memory:
            assert stats.read.bytes == loaded.bank_file().nbytes // 2
    assert outputs[:2] == outputs[2:]


def test_dense_from_the_file_equals_the_resident_dense(banks):
    from_file = load(banks / "q4", dense=False).dense_ffn()
    resident = load(banks / "q4", dense=False)
    resident.bank()
    stacked = resident.dense_ffn()
    for field in ("gate_up", "down_t", "gate_up_scales", "down_t_biases"):
        for layer in range(resident.num_layers):
            assert mx.array_equal(getattr(from_file, field)[layer], getattr(stacked, field)[layer])


def test_memory_estimates_and_sizes(smollm2_dir, smollm2):
    dense = need(smollm2_dir, smollm2.config, None, False, 100)
    pruned = need(smollm2_dir, smollm2.config, 0.5, False, 100)
    low = need(smollm2_dir, smollm2.config, 0.5, True, 100)
    assert low.total < dense.total < pruned.total
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1.5G") == 3 << 29 and parse_bytes("2000") == 2000
    with pytest.raises(IFPError, match="is not a size"):
        parse_bytes("lots")


def run(args, budget):
    env = {**os.environ, "IFP_MEMORY_BUDGET": budget}
    return subprocess.run([*IFP, *args], capture_output=True, text=True, env=env)


def one_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_fit_check_refuses_and_says_what_would_fit(smollm2_dir):
    model = ["generate", "hi", "-m", str(smollm2_dir), "-n", "2"]
    line = one_line(run(model + ["--keep", "0.5"], "600M"))
    assert "needs about" in line and "(bank in memory)" in line and "IFP_MEMORY_BUDGET" in line
    assert "--low-memory" in line and "ifp convert SRC OUT -q" in line
    assert "--low-memory --keep 0.5 (" in one_line(run(model, "500M"))  # dense does not fit either
    line = one_line(run(model + ["--keep", "0.5", "--low-memory"], "50M"))
    assert "(--low-memory)" in line and "--low-memory (" not in line
    assert "is not a size" in one_line(run(model, "plenty"))
    fits = run(model + ["--keep", "0.5", "--low-memory"], "600M")
    assert fits.returncode == 0, fits.stderr
    assert "read " in fits.stderr and "MB from disk" in fits.stderr


def test_low_memory_needs_pruning(smollm2_dir):
    line = one_line(run(["generate", "hi", "-m", str(smollm2_dir), "--low-memory"], "100G"))
    assert "--low-memory reads only the selected channels" in line
