"""What a new user hit first, run as they ran it: the real CLI in a subprocess, the real SmolLM2.

Narrow terminals and pipes, bytes that are not text, prompts past the model's
context, and importing mlx.core before ifp_mlx.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ifp_mlx.convert.registry import MODELS

from ifp_mlx.blas import OPENBLAS_CANDIDATES
from ifp_mlx.errors import IFPError

IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]
OVERFLOW = re.compile(r"is (\d+) tokens \+ 2 to generate = (\d+), more than the model's context of (\d+) tokens")


def env(**extra: str) -> dict[str, str]:
    """The environment of a user at an 80-column terminal (and, as here, in a pipe)."""
    return {**os.environ, "COLUMNS": "80", **extra}


def ifp(*args, stdin: bytes | str | None = None, **extra: str) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run([*IFP, *args], capture_output=True, input=data, env=env(**extra))
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def with_context(model: Path, folder: Path, context: int) -> Path:
    """The same model (its files linked, not copied) with a shorter context in config.json.

    Lets --truncate run on a real model without prefilling 8,192 tokens,
    which takes minutes on a CPU.
    """
    folder.mkdir()
    for f in model.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f.resolve())
    config = json.loads((model / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    return folder


def test_list_prints_names_and_long_paths_whole(smollm2_dir, tmp_path):
    home = tmp_path / ("an-ifp-home-folder-with-a-long-name-" * 3) / "cache"
    (home / "models").mkdir(parents=True)
    (home / "models" / "smollm2-135m").symlink_to(smollm2_dir.resolve())
    result = ifp("list", "--available", IFP_HOME=str(home))
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    words = result.stdout.split()
    for name in MODELS:
        assert name in words, result.stdout
    assert str(home / "models" / "smollm2-135m") in words, result.stdout
    listed = next(line for line in result.stdout.splitlines() if line.startswith("smollm2-135m "))
    assert "float32" in listed and "135M" in listed


def test_eval_table_prints_names_whole(smollm2_dir, tmp_path):
    domains = ("a-domain-with-a-rather-long-name", "another-domain-also-named-at-length")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(
        json.dumps({"id": f"e{i}", "domain": d, "prompt": "Say hi.", "response": "Hi."}) + "\n" for i, d in enumerate(domains)
    ))
    result = ifp("eval", str(heldout), "--model", str(smollm2_dir), "--selectors", "dense,activations")
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("selector"))
    assert header.split() == ["selector", *domains, "within", "across"]
    assert [line.split()[0] for line in lines[lines.index(header) + 1 :]] == ["dense", "activations"]


def test_generate_refuses_bytes_that_are_not_utf8(smollm2_dir):
    line = one_line_error(ifp("generate", "-", "--model", str(smollm2_dir), "-n", "2", stdin=b"\xff\xfe"))
    assert line == "error: stdin is not UTF-8 text (byte 0xff at offset 0)"
    line = one_line_error(ifp("generate", b"ok \xe9t\xe9", "--model", str(smollm2_dir), "-n", "2"))
    assert line == "error: the prompt is not UTF-8 text (byte 0xe9 at offset 3)"


def test_generate_reads_utf8_stdin(smollm2_dir):
    result = ifp("generate", "-", "--model", str(smollm2_dir), "-n", "2", stdin="Bonjour, ça va ? 日本".encode())
    assert result.returncode == 0, result.stderr
    assert "prompt" in result.stderr and "tok/s" in result.stderr


def test_generate_refuses_prompt_longer_than_the_context(smollm2_dir):
    words = " ".join(["word"] * 9000)
    line = one_line_error(ifp("generate", "-", "--model", str(smollm2_dir), "-n", "2", stdin=words))
    match = OVERFLOW.search(line)
    assert match, line
    prompt, total, context = map(int, match.groups())
    assert prompt > 9000 and total == prompt + 2 and context == 8192
    assert "--truncate" in line


def test_generate_truncate_keeps_the_end_of_the_prompt(smollm2_dir, tmp_path):
    short = with_context(smollm2_dir, tmp_path / "short", 96)
    words = " ".join(f"w{i}" for i in range(300))
    line = one_line_error(ifp("generate", words, "--model", str(short), "-n", "2"))
    assert OVERFLOW.search(line) and "context of 96 tokens" in line
    result = ifp("generate", words, "--model", str(short), "-n", "2", "--truncate")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "context of 96 tokens" in warning[0] and "dropped its first" in warning[0], result.stderr
    prompt = int(re.search(r"prompt (\d+) tok", result.stderr).group(1))
    assert 40 < prompt <= 96 - 2


def test_fit_prompt_drops_the_oldest_text_and_keeps_the_template(smollm2_loaded):
    from ifp_mlx.engine.prompts import check_context, fit_prompt

    tokenizer = smollm2_loaded.tokenizer
    text = " ".join(f"w{i}" for i in range(300)) + " the end"
    tokens, dropped = fit_prompt(tokenizer, text, max_tokens=10, context_length=128)
    assert dropped > 0 and len(tokens) <= 118
    decoded = tokenizer.decode(tokens)
    assert decoded.startswith("<|im_start|>") and decoded.endswith("the end<|im_end|>\n<|im_start|>assistant\n")
    assert " w0 " not in decoded and "w299" in decoded
    assert fit_prompt(tokenizer, "short", max_tokens=10, context_length=128)[1] == 0
    with pytest.raises(IFPError, match="leave no room"):
        fit_prompt(tokenizer, text, max_tokens=125, context_length=128)
    with pytest.raises(IFPError, match=r"prompt is 100 tokens \+ 29 to generate = 129, more than the model's context of 128"):
        check_context([0] * 100, 29, 128)
    check_context([0] * 100, 28, 128)
    check_context([0] * 100_000, 28, None)


def test_generate_refuses_empty_prompts_and_no_tokens(smollm2_dir):
    model = ("--model", str(smollm2_dir))
    assert one_line_error(ifp("generate", "", *model)) == "error: the prompt is empty: give some text to reply to"
    assert "stdin is empty" in one_line_error(ifp("generate", "-", *model, stdin=" \n"))
    assert "(2 of 2) is empty" in one_line_error(ifp("generate", "hi", "  ", *model))
    assert "--task is empty" in one_line_error(ifp("generate", "hi", "--task", "", *model))
    assert one_line_error(ifp("generate", "hi", *model, "-n", "0")) == "error: --max-tokens must be at least 1 (got 0)"
    assert "--max-tokens" in one_line_error(ifp("generate", "hi", *model, "--max-tokens", "-3"))


def python(code: str, **extra: str) -> subprocess.CompletedProcess:
    """``python -c code`` without LD_PRELOAD or IFP_NO_OPENBLAS, either of which would hide the warning."""
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IFP_NO_OPENBLAS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **extra})


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not any(os.path.exists(p) for p in OPENBLAS_CANDIDATES),
    reason="the OpenBLAS preload is for Linux with OpenBLAS installed",
)
def test_importing_mlx_first_warns_once():
    late = python("import mlx.core; import ifp_mlx; import ifp_mlx.blas as b; b.preload_openblas()")
    assert late.returncode == 0, late.stderr
    lines = [line for line in late.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ifp_mlx: warning: mlx.core was imported before ifp_mlx"), late.stderr
    assert "import ifp_mlx first" in lines[0] and "LD_PRELOAD=" in lines[0]
    first = python("import ifp_mlx; import mlx.core; import ifp_mlx.blas as b; b.preload_openblas()")
    assert first.returncode == 0 and first.stderr.strip() == "", first.stderr
    openblas = next(p for p in OPENBLAS_CANDIDATES if os.path.exists(p))
    preloaded = python("import mlx.core; import ifp_mlx", LD_PRELOAD=openblas)
    assert preloaded.returncode == 0 and preloaded.stderr.strip() == "", preloaded.stderr
    opted_out = python("import mlx.core; import ifp_mlx", IFP_NO_OPENBLAS="1")
    assert opted_out.returncode == 0 and opted_out.stderr.strip() == "", opted_out.stderr
