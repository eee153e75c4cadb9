"""The code sandbox and HumanEval's scorer, with real programs in real child processes."""

import ast
import socket
import subprocess
import sys

import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
from ifp_mlx.data.builders import humaneval_records
from ifp_mlx.evaluate.humaneval import check_completion, extract_code, program
from ifp_mlx.evaluate.sandbox import RUNNER, Limits, run_python, sandbox_report

FIRST = humaneval_records()[0]  # HumanEval/0, has_close_elements


def test_correct_and_wrong_humaneval_completions():
    meta = FIRST["meta"]
    whole = f"Here it is:\n\n```python\n{FIRST['response']}\n```\nIt compares every pair."
    assert check_completion(meta, whole)["passed"]
    body = FIRST["response"][len(meta["stub"]):]  # the canonical body alone continues the stub
    assert check_completion(meta, body)["passed"]
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    result = check_completion(meta, wrong)
    assert not result["passed"] and result["status"] == "failed" and "AssertionError" in result["reason"]


def test_extract_code_prefers_the_block_defining_the_entry_point():
    reply = "```\nprint(1)\n```\nthen\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(reply, "f") == "def f(x):\n    return x\n"
    assert extract_code("```python\ndef f(x):\n    return", "f") == "def f(x):\n    return"  # cut off by max tokens
    source = program("import math\n\ndef f(x):\n    \"\"\"doc\"\"\"\n", "    return x\n", "def check(c):\n    assert c(2) == 2", "f")
    assert run_python(source).passed


def test_sandbox_kills_an_infinite_loop():
    result = run_python("while True:\n    pass\n", Limits(seconds=3, cpu=1))
    assert result.status in ("timeout", "killed"), result
    assert result.seconds < 3 + 2  # stopped at the deadline (or at its CPU limit before it)


def test_sandbox_refuses_a_huge_allocation():
    result = run_python("x = bytearray(16 << 30)\nprint('allocated')\n")
    assert result.status == "failed" and "MemoryError" in result.reason, result
    assert "allocated" not in result.stdout


def test_sandbox_stops_writes_outside_its_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    for write in (f"open({str(outside)!r}, 'w').write('x')",
                  f"import os\nos.close(os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT))"):
        result = run_python(write)
        assert result.status == "failed" and "PermissionError" in result.reason, result
        assert not outside.exists()
    inside = run_python("open('note.txt', 'w').write('kept')\nprint(open('note.txt').read())")
    assert inside.passed and inside.stdout.strip() == "kept", inside


def test_the_kernel_stops_writes_even_without_the_audit_hook(tmp_path):
    """Landlock alone (the runner's kernel-side guard, no audit hook) refuses the same write."""
    folder, outside = tmp_path / "work", tmp_path / "outside.txt"
    folder.mkdir()
    code = (f"import runpy; guard = runpy.run_path({str(RUNNER)!r}, run_name='runner'); "
            f"abi = guard['landlock']({str(folder)!r}); print(abi); open({str(outside)!r}, 'w')")
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=folder)
    report = sandbox_report()
    if "landlock" in report["kernel_layers"]:
        assert result.returncode == 1 and "PermissionError" in result.stderr, result.stderr
        assert not outside.exists()
    else:  # an OS without Landlock says so, rather than claiming it
        assert report["layers"].get("landlock", "none").startswith("none")


def test_sandbox_has_no_network_no_processes_and_an_empty_environment():
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert not result.passed and ("PermissionError" in result.reason or "refused" in result.reason.lower()), result
    finally:
        server.close()
    spawn = run_python("import subprocess\nsubprocess.run(['/bin/true'])\n")
    assert not spawn.passed and "PermissionError" in spawn.reason
    env = run_python("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(os.listdir('.'))")
    names, cwd, listing = env.stdout.strip().splitlines()
    # Python's own locale coercion and bwrap's PWD (the folder), nothing from ifp's environment
    assert set(ast.literal_eval(names)) <= {"LC_CTYPE", "PWD"}
    assert cwd.endswith("/work") and "ifp-sandbox-" in cwd and ast.literal_eval(listing) == ["program.py"]
    report = sandbox_report()
    assert set(report["layers"]["rlimits"].split(", ")) >= (
        {"RLIMIT_CPU", "RLIMIT_FSIZE"} if sys.platform == "darwin" else {"RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE"})


def test_source_that_is_not_valid_text_fails_in_the_child_not_in_ifp():
    for source in ("x = '\udc80'\n", "x = 1\0\n", "def f(:\n"):
        result = run_python(source)
        assert result.status == "failed" and result.reason, (source, result)
