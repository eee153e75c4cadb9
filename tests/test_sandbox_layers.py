"""Each kernel layer of the sandbox holds on its own: the attacks of test_sandbox_attacks.py against one layer.

The outer layers (a uid of no one's, bubblewrap's namespaces) run a bare
Python with no runner: no seccomp, Landlock, rlimits or audit hook. The
seccomp filter runs in a bare child without namespaces or hook. Where this
machine lacks a layer the report must say so rather than claim it.
"""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
from ifp_mlx.errors import IFPError
from ifp_mlx.evaluate.sandbox import RUNNER, Limits, report, run_under, sandbox_report
from ifp_mlx.evaluate.sandbox_layers import Plan, detect, others_can_reach
from ifp_mlx.evaluate.seccomp_filter import compile_filter
from sandboxing import folder, outer_only, processes_with, token, visible_target, xattrs

LINUX = sys.platform.startswith("linux")


def test_the_report_names_the_layers_this_machine_has():
    layers = sandbox_report()["layers"]
    kernel = sandbox_report()["kernel_layers"]
    if not LINUX:
        assert kernel == (["sandbox-exec"] if shutil.which("sandbox-exec") else [])
        return
    assert ("uid" in kernel) == (os.geteuid() == 0 and detect().uid is not None)
    assert ("namespaces" in kernel) == (detect().bwrap is not None or detect().unshare is not None)
    assert layers["namespaces"].startswith("bubblewrap") == (detect().bwrap is not None)
    if detect().bwrap is None:  # the line says why: bwrap missing, or refused here (no user namespaces)
        assert ("bwrap does not start here" if shutil.which("bwrap") else "apt-get install bubblewrap") in layers["namespaces"]
    assert ("seccomp" in kernel) == (compile_filter(False) is not None)
    assert set(layers) == {"uid", "namespaces", "seccomp", "landlock", "rlimits", "audit hook"}
    assert sandbox_report()["interpreter"].startswith(detect().interpreter)


def test_no_kernel_layer_means_no_score():
    """The audit hook alone is no sandbox: a plan without any kernel layer is refused in one line."""
    bare = Plan(sys.executable, seccomp=False, landlock=False, seatbelt=False)
    with pytest.raises(IFPError) as refused:
        report(bare)
    assert "\n" not in str(refused.value) and "no kernel layer" in str(refused.value)


def test_the_uid_is_no_ones_and_reaches_only_what_strangers_may(tmp_path):
    plan = detect()
    if plan.uid is None:  # not root, or no interpreter a stranger could run: the report says so
        assert sandbox_report()["layers"]["uid"].startswith("none")
        return
    assert others_can_reach(plan.interpreter, execute=True)
    secret = tmp_path / "secret"
    secret.write_text("root's")
    os.chmod(secret, 0o600)
    with folder(dataclasses.replace(plan, bwrap=None, unshare=None)) as work:  # the uid alone, no namespaces
        result = outer_only(dataclasses.replace(plan, bwrap=None, unshare=None), work, f"""
import os
open('mine', 'w').write('x')
for attempt in (lambda: open({str(secret)!r}).read(), lambda: os.listdir('/root'), lambda: os.setuid(0)):
    try:
        attempt()
        print('reached')
    except PermissionError:
        print('refused')
""")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["refused"] * 3
        assert os.stat(work / "mine").st_uid == plan.uid  # the host sees a uid of no one's


def test_an_interpreter_strangers_cannot_reach_is_never_chosen():
    """A Python under a folder only its owner may enter (a pyenv in /root) would not start as the sandbox's uid."""
    with tempfile.TemporaryDirectory() as top:  # under /tmp, which anyone may enter
        os.chmod(top, 0o755)
        for name, mode in (("closed", 0o700), ("open", 0o755)):
            (Path(top) / name).mkdir()
            (Path(top) / name / "python3").write_bytes(b"")
            os.chmod(Path(top) / name / "python3", 0o755)
            os.chmod(Path(top) / name, mode)
        assert not others_can_reach(f"{top}/closed/python3", execute=True)
        assert others_can_reach(f"{top}/open/python3", execute=True)
        assert others_can_reach(f"{top}/open/python3", execute=False)  # 0o755 is readable too
    plan = detect()
    if plan.uid is not None:
        assert others_can_reach(plan.interpreter, execute=True) and os.path.realpath(plan.interpreter) == plan.interpreter


def bwrap_plan():
    plan = detect()
    if plan.bwrap is None:
        assert not sandbox_report()["layers"].get("namespaces", "none").startswith("bubblewrap")
        return None
    return plan


def test_the_namespaces_alone_hide_the_host(tmp_path):
    plan = bwrap_plan()
    if plan is None:
        return
    path = tmp_path / "daemon.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o777)
    server.listen()
    server.settimeout(0.2)
    try:
        with folder(plan) as work, visible_target() as target:
            before = os.stat(target)
            result = outer_only(plan, work, f"""
import os, socket
print(os.listdir('/tmp'), os.listdir('/run'), os.listdir('/dev/shm'))
print(socket.if_nameindex())
def attempt(action):
    try:
        action()
        return 'reached'
    except OSError as error:
        return type(error).__name__
s = socket.socket(socket.AF_UNIX)
T = {str(target)!r}
print(attempt(lambda: s.connect({str(path)!r})), attempt(lambda: os.chmod(T, 0o4777)),
      attempt(lambda: os.utime(T, (0, 0))), attempt(lambda: os.setxattr(T, 'user.x', b'1')),
      attempt(lambda: open(T, 'a')), attempt(lambda: open('/etc/ifp-test', 'w')),
      attempt(lambda: socket.create_connection(('1.1.1.1', 53), timeout=1)))
""")
            assert result.returncode == 0, result.stderr
            listings, interfaces, attempts = result.stdout.splitlines()
            tmp_listing = listings.split("]")[0]
            assert work.parent.name in tmp_listing and "pytest" not in tmp_listing  # its own /tmp: only its folder
            assert listings.endswith("[] []")  # /run and /dev/shm: empty
            assert "eth" not in interfaces and "ens" not in interfaces  # only a loopback
            assert "reached" not in attempts.split(), attempts
            after = os.stat(target)
            assert (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime) and xattrs(target) == []
            assert not os.path.exists("/etc/ifp-test")
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("ending", ["exits", "outlives the deadline"])
def test_the_pid_namespace_ends_every_process_with_the_first(ending):
    """A double-forked setsid child (the seccomp filter off, so it can start) dies with the sandbox."""
    plan = bwrap_plan()
    if plan is None:
        return
    mark = token()
    daemon = f"import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep({mark})"
    program = ("import sys\nsys.audit = lambda *args: None\nimport subprocess, time\n"
               f"print(subprocess.Popen([sys.executable, '-c', '{daemon}'], start_new_session=True).pid, flush=True)\n"
               + ("time.sleep(1)\n" if ending == "exits" else "time.sleep(60)\n"))
    limits = Limits(seconds=3, processes=64)
    result = run_under(dataclasses.replace(plan, seccomp=False), [("program.py", program)], limits)
    assert result.stdout.strip().isdigit(), result  # the child was started
    assert result.status == ("passed" if ending == "exits" else "timeout"), result
    deadline = time.monotonic() + 3
    while processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(mark) == []


def test_the_seccomp_filter_alone_refuses_the_escapes(tmp_path):
    """In a bare child (ifp's own uid, no namespaces, no audit hook), once the runner has loaded the filter."""
    bpf = compile_filter(False)
    if bpf is None:
        assert sandbox_report()["layers"].get("seccomp", "none").startswith("none")
        return
    path, target = tmp_path / "daemon.sock", tmp_path / "target.txt"
    target.write_text("x")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    code = f"""
import errno, json, os, runpy, socket, threading
guard = runpy.run_path({str(RUNNER)!r}, run_name='runner')
print(guard['seccomp'](bytes.fromhex({bpf.hex()!r})))
def attempt(action):
    try:
        action()
        return 'reached'
    except OSError as error:
        return errno.errorcode[error.errno]
    except RuntimeError:  # a thread that cannot start
        return 'EPERM'
print(json.dumps([attempt(lambda: socket.socket(socket.AF_UNIX).connect({str(path)!r})),
                  attempt(lambda: socket.socketpair()), attempt(os.fork),
                  attempt(lambda: os.execv('/bin/true', ['true'])),
                  attempt(lambda: os.posix_spawn('/bin/true', ['true'], {{}})),
                  attempt(lambda: os.setxattr({str(target)!r}, 'user.x', b'1')),
                  attempt(lambda: os.unshare(os.CLONE_NEWUSER) if hasattr(os, 'unshare') else os.fork()),
                  attempt(lambda: threading.Thread(target=print).start())]))
"""
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    server.close()
    loaded, attempts = result.stdout.splitlines()
    assert loaded == "True", result.stderr
    assert json.loads(attempts) == ["EPERM"] * 8
    assert xattrs(target) == []


def test_the_child_has_no_privilege_left():
    """No capabilities, no groups, no_new_privs, and (where libseccomp is) one seccomp filter, as the kernel sees it."""
    if not LINUX:  # no /proc/self/status
        return
    result = run_under(detect(), [("program.py", "print(open('/proc/self/status').read())")], Limits())
    status = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert int(status["CapEff"], 16) == 0 and int(status["NoNewPrivs"]) == 1
    if detect().uid is not None:
        assert status["Uid"].split()[0] != "0" and status["Groups"].strip() in ("", "1000")
    assert int(status["Seccomp"]) == (2 if compile_filter(False) else 0)
