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


def test_keep_prunes_with_the_best_selector_the_model_has(smollm2_dir, tmp_path):
    """SmolLM2 has a shipped predictor; a fresh conversion of another model does not."""
    result = ifp("generate", "Hello", "--model", str(smollm2_dir), "--keep", "0.5", "-n", "2")
    assert result.returncode == 0, result.stderr
    assert "predictor: k 768/1536 per layer" in " ".join(result.stderr.split())
    write_hf_folder(tmp_path / "hf", "llama")
    assert ifp("convert", str(tmp_path / "hf"), str(tmp_path / "tiny")).returncode == 0
    result = ifp("generate", "Hello", "--model", str(tmp_path / "tiny"), "--keep", "0.5", "-n", "2")
    assert result.returncode == 0, result.stderr
    assert "activations: k" in " ".join(result.stderr.split())


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


def _tiny_model_and_data(tmp_path):
    import json

    write_hf_folder(tmp_path / "hf", "llama", intermediate_size=64, num_hidden_layers=2)
    assert ifp("convert", str(tmp_path / "hf"), str(tmp_path / "model")).returncode == 0
    records = [
        {"id": f"{d}-{i}", "domain": d, "prompt": f"{d} question {i}", "response": f"answer {i} for {d}"}
        for d in ("code", "math") for i in range(3)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "model", data


def test_train_resume_and_eval(tmp_path):
    model, data = _tiny_model_and_data(tmp_path)
    pred = tmp_path / "pred"
    common = (str(data), "--model", str(model), "--out", str(pred), "--backbone", "shared:1", "--batch-size", "2")
    result = ifp("train", *common, "--stage", "sft", "--steps", "2", "--log-every", "1")
    assert result.returncode == 0, result.stderr
    logged = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert len(logged) == 2 and all('"loss"' in line and '"overlap"' in line for line in logged)
    assert (pred / "config.json").is_file() and (pred / "predictor.safetensors").is_file()
    assert_one_line_error(ifp("train", *common, "--stage", "sft", "--steps", "2"), "already exists")
    result = ifp("train", *common, "--stage", "sft", "--steps", "3", "--resume")
    assert result.returncode == 0 and "resumed at step 2" in result.stderr, result.stderr
    result = ifp("eval", str(data), "--model", str(model), "--predictor", str(pred), "--json", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["selectors"]) == {"dense", "static", "activations", "random", "predictor"}  # the default set
    assert report["examples"] == 6
    assert set(report["selectors"]["predictor"]["nll"]) == {"code", "math"}


def test_train_bad_input_fails_before_loading(tmp_path):
    """The model folder does not exist: these errors must come before it is opened."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "1", "domain": "code", "prompt": "p", "response": "r"}\n')
    base = ("train", str(data), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "pred"))
    assert_one_line_error(ifp(*base, "--temperature", "0"), "--temperature must be > 0")
    assert_one_line_error(ifp(*base, "--resume"), "no checkpoint to resume from")
