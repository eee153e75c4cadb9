"""Hostile input to `ifp generate` and a piped `ifp chat`: closed standard descriptors, bytes that
are not UTF-8, NUL bytes, a prompt of a million characters, commands with bad arguments.

Each is a real subprocess on a tiny random model (a context of 512 tokens), and each must end in
a one-line error or a normal run, never a traceback, with the rest of a conversation kept.
"""

import json
import os
import subprocess
import sys

import pytest
from tiny import write_hf_folder

IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ifp_mlx.convert import ConvertOptions, convert

    folder = tmp_path_factory.mktemp("hostile")
    write_hf_folder(folder / "hf", "llama")
    convert(folder / "hf", folder / "model", ConvertOptions())
    return folder / "model"


def run(args: list, stdin: bytes = b"", shell_redirect: str = "", home=None) -> subprocess.CompletedProcess:
    """``ifp ARGS``, its descriptors redirected by ``shell_redirect`` (``<&-`` closes stdin)."""
    command = ["sh", "-c", f'exec "$@" {shell_redirect}', "sh", *IFP, *args]
    env = dict(os.environ, **({"IFP_HOME": str(home)} if home else {}))
    return subprocess.run(command, input=stdin, capture_output=True, timeout=TIMEOUT, env=env)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command (status 2, no traceback)."""
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("redirect", ["<&-", ">&-", "2>&-", "<&- >&- 2>&-"])
def test_generate_runs_with_standard_descriptors_closed(tiny_model, redirect):
    """A descriptor closed by the caller is /dev/null: MLX would refuse weights opened on 0."""
    result = run(["generate", "Hi", "-m", str(tiny_model), "-n", "3"], shell_redirect=redirect)
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err, err
    if "2>&-" not in redirect:
        assert "tok/s" in err  # the statistics line still reaches stderr


def test_commands_that_read_stdin_see_it_empty_when_closed(tiny_model, tmp_path):
    refused = one_line_error(run(["generate", "-", "-m", str(tiny_model)], shell_redirect="<&-"))
    assert "the prompt on stdin is empty" in refused
    chat = run(["chat", "-m", str(tiny_model)], shell_redirect="<&-", home=tmp_path)
    assert chat.returncode == 0 and "Traceback" not in chat.stderr.decode()


def test_generate_refuses_bytes_that_are_not_utf8(tiny_model):
    piped = one_line_error(run(["generate", "-", "-m", str(tiny_model)], stdin=b"Hi \xff there"))
    assert "stdin is not UTF-8 text (byte 0xff at offset 3)" in piped
    argv = one_line_error(run(["generate", b"caf\xe9", "-m", str(tiny_model)]))
    assert "the prompt is not UTF-8 text (byte 0xe9 at offset 3)" in argv


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option", ["--task", "--system"])
def test_options_with_bytes_that_are_not_utf8_are_refused(tiny_model, command, option):
    args = [command, *(["Hi"] if command == "generate" else []), "-m", str(tiny_model), option, b"ab\xff"]
    assert f"{option} is not UTF-8 text (byte 0xff at offset 2)" in one_line_error(run(args))


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option, value, message", [
    ("--temp", "nan", "--temp must be >= 0"), ("--temp", "inf", "--temp must be >= 0"),
    ("--top-p", "nan", "--top-p in (0, 1]"), ("--seed", "-1", "--seed must be in 0..2**64-1"),
    ("--seed", str(2**64), "--seed must be in 0..2**64-1"),
    ("--keep", "nan", "--keep must be in (0, 1], got nan"), ("--keep", "inf", "--keep must be in (0, 1], got inf"),
])
def test_sampling_options_out_of_range_are_refused(tiny_model, command, option, value, message):
    """NaN passed ``temp < 0`` and sampled; a negative seed was MLX's TypeError traceback; a
    NaN keep reached the fit check's arithmetic (a ValueError traceback)."""
    args = [command, *(["Hi"] if command == "generate" else []), "-m", str(tiny_model), option, value]
    assert message in one_line_error(run(args))


def test_a_nul_byte_is_text(tiny_model):
    result = run(["generate", "-", "-m", str(tiny_model), "-n", "2"], stdin=b"Hi\x00there")
    assert result.returncode == 0 and "tok/s" in result.stderr.decode(), result.stderr.decode()


def test_a_huge_prompt_is_refused_by_its_characters(tiny_model):
    """A million characters are refused from a prefix, not tokenized and templated whole."""
    refused = one_line_error(run(["generate", "-", "-m", str(tiny_model), "-n", "12"], stdin=b"hello world " * 90_000))
    assert "the prompt on stdin is 1,080,000 characters, more than the model's context of 512 tokens" in refused
    assert "with 12 to generate" in refused and "--truncate" in refused


def test_a_piped_chat_refuses_bad_lines_and_keeps_the_conversation(tiny_model, tmp_path):
    saved = tmp_path / "chat.json"
    lines = [
        b"Hello there", b"caf\xe9 au lait", b"x" * 10 + b" word" * 200_000, b"/keep nan", b"/keep inf",
        b"/keep -1", b"/save a\x00b", b"/save " + bytes(tmp_path), b"/quit now", b"/selector \xff",
        b"How are you?", b"/save " + bytes(saved),
    ]
    result = run(["chat", "-m", str(tiny_model), "-n", "2"], stdin=b"\n".join(lines) + b"\n", home=tmp_path / "home")
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err, err
    errors = [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error:")]
    expected = [
        "line 2 is not UTF-8 text (byte 0xe9 at offset 3)",
        "the message is 1,000,010 characters, more than the model's context of 512 tokens holds with 2 to generate",
        "/keep takes a fraction of channels in (0, 1], e.g. /keep 0.5 (got 'nan')",
        "/keep takes a fraction of channels in (0, 1], e.g. /keep 0.5 (got 'inf')",
        "--keep must be in (0, 1], got -1.0",
        "could not save to a\x00b: embedded null byte",
        f"could not save to {tmp_path}: Is a directory",
        "/quit takes no argument (got 'now')",
        "line 10 is not UTF-8 text (byte 0xff at offset 10)",
    ]
    assert len(errors) == len(expected) and all(e.startswith(x) for e, x in zip(errors, expected)), err
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2  # the refused lines changed nothing
    assert [messages[0]["content"], messages[2]["content"]] == ["Hello there", "How are you?"]


def test_a_huge_prompt_is_no_memory_error(smollm2_dir):
    """The fit check counted a million characters as a KV of a million tokens: "needs 55 GB, convert to 4-bit"."""
    refused = one_line_error(run(["generate", "-", "-m", str(smollm2_dir)], stdin=b"hello world " * 90_000))
    assert "more than the model's context of 8192 tokens" in refused and "GB" not in refused
