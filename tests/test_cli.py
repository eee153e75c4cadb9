"""The ifp command line as a user runs it: real subprocesses, real models."""

import os
import re
import subprocess
import sys

from tiny import write_hf_folder

IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]


def ifp(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*IFP, *args], capture_output=True, text=True, input=stdin, env=os.environ.copy())


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert pattern in lines[0]


def test_help_lists_commands_with_examples():
    result = ifp("--help")
    assert result.returncode == 0
    commands = ("convert", "pull", "list", "generate", "bench", "calibrate", "masks", "convert-predictor", "train", "eval", "data")
    for command in commands:
        assert command in result.stdout
        sub = ifp(command, "--help")
        assert sub.returncode == 0 and re.search(f"Examples?: ifp {command}", " ".join(sub.stdout.split())), command


def test_generate_streams_answer_and_stats(smollm2_dir):
    result = ifp("generate", "What is the capital of France?", "--model", str(smollm2_dir), "-n", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tok/s" in result.stderr and "ttft" in result.stderr and "peak" in result.stderr


def test_generate_reads_stdin_and_seeded_sampling_repeats(smollm2_dir):
    args = ("generate", "-", "--model", str(smollm2_dir), "-n", "8", "--temp", "0.8", "--seed", "3", "--no-chat-template")
    first, second = ifp(*args, stdin="Once upon a time"), ifp(*args, stdin="Once upon a time")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_generate_bad_input(smollm2_dir, tmp_path):
    assert_one_line_error(ifp("generate", "hi", "--model", str(smollm2_dir), "-n", "0"), "--max-tokens")
    assert_one_line_error(ifp("generate", "hi", "--model", str(tmp_path / "nope")), "no such model folder")
    assert_one_line_error(ifp("generate", "hi", "--model", str(tmp_path)), "not a model folder")


def test_convert_cli_and_errors(tmp_path):
    write_hf_folder(tmp_path / "hf", "llama")
    result = ifp("convert", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stderr and (tmp_path / "out" / "ffn_bank.safetensors").exists()
    assert_one_line_error(ifp("convert", str(tmp_path / "hf"), str(tmp_path / "out")), "already exists")
    assert_one_line_error(ifp("convert", str(tmp_path / "hf"), str(tmp_path / "o2"), "--dtype", "int4"), "unknown dtype")
    assert_one_line_error(ifp("convert", str(tmp_path / "missing"), str(tmp_path / "o3")), "no such file")


def test_list_and_pull_errors(smollm2_dir):
    result = ifp("list", "--available")
    assert result.returncode == 0 and "smollm2-135m" in result.stdout
    assert_one_line_error(ifp("pull", "gpt-5"), "unknown model 'gpt-5'")


def test_generate_pruned_task_mode_gathers_once(smollm2_dir):
    result = ifp(
        "generate", "Capital of Spain?", "Capital of Italy?", "--model", str(smollm2_dir), "-n", "6",
        "--keep", "0.5", "--selector", "activations", "--task", "Answer geography questions briefly.",
    )
    assert result.returncode == 0, result.stderr
    stats = " ".join(result.stderr.split())
    assert stats.count("k 768/1536 per layer") == 2
    assert "gathered, gathers 1" in stats and "cached submodel, gathers 1" in stats
    assert "select" in stats and "gather" in stats and "prefill" in stats and "first token" in stats


def test_calibrate_then_static_mask(smollm2_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    mask = tmp_path / "static.safetensors"
    result = ifp("calibrate", str(smollm2_dir), str(text), "--keep", "0.33", "--out", str(mask))
    assert result.returncode == 0, result.stderr
    assert "k 512/1536" in result.stderr
    result = ifp("generate", "Hello", "--model", str(smollm2_dir), "--selector", "static", "--mask", str(mask), "-n", "4")
    assert result.returncode == 0, result.stderr
    assert "k 512/1536 per layer" in " ".join(result.stderr.split())


def test_pruning_bad_input(smollm2_dir, tmp_path):
    model = ("--model", str(smollm2_dir), "-n", "2")
    assert_one_line_error(ifp("generate", "hi", *model, "--keep", "0"), "--keep must be in (0, 1]")
    assert_one_line_error(ifp("generate", "hi", *model, "--keep", "1.5"), "--keep must be in (0, 1]")
    assert_one_line_error(ifp("generate", "hi", *model, "--k", "5000"), "--k must be in 1..1536")
    assert_one_line_error(ifp("generate", "hi", *model, "--keep", "0.5", "--selector", "magic"), "unknown selector 'magic'")
    write_hf_folder(tmp_path / "hf", "llama")
    assert ifp("convert", str(tmp_path / "hf"), str(tmp_path / "tiny")).returncode == 0
    mask = tmp_path / "tiny-mask.safetensors"
    assert ifp("calibrate", str(tmp_path / "tiny"), "--k", "16", "--out", str(mask)).returncode == 0
    assert_one_line_error(
        ifp("generate", "hi", *model, "--selector", "static", "--mask", str(mask)), "made for another model"
    )
