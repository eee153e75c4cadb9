"""Run untrusted Python (a model's code) in a separate, limited process.

Generated code never runs in the ifp process. Each program gets a child
``python -I -B`` (no site-user paths, no bytecode written) that starts in a
private temporary folder with an empty environment, under resource limits, and
is killed at a wall-clock deadline. What the OS adds:

- Linux: a new network namespace (``unshare -rn``, where user namespaces are
  permitted): the child has no network interface but a down loopback; Landlock
  (kernel 5.13+) lets it write only inside its folder and, from ABI 4, refuses
  TCP connect/bind even without the namespace;
- macOS: ``sandbox-exec`` with a profile denying all network and every file
  write outside the folder (RLIMIT_AS is not enforced by macOS, so memory is
  bounded only by the CPU limit and the deadline there);
- everywhere: an audit hook in the child refusing writes outside the folder,
  new processes, sockets and ctypes (``sandbox_runner.py``).

``sandbox_report()`` says which of these took effect on this machine; the
evaluation records it beside its results.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import IFPError

RUNNER = Path(__file__).with_name("sandbox_runner.py")
TAIL_BYTES = 2000  # of stdout/stderr kept in a result
MACOS_PROFILE = """(version 1)
(allow default)
(deny network*)
(deny file-write*)
(allow file-write* (subpath "{folder}") (literal "/dev/null"))
"""


@dataclass(frozen=True)
class Limits:
    """What one program may use. ``processes`` 0: no new processes or threads
    (the kernel does not apply RLIMIT_NPROC to root; the audit hook still
    refuses fork, exec and spawn)."""

    seconds: float = 10.0  # wall clock
    cpu: int = 10  # CPU seconds (RLIMIT_CPU)
    memory: int = 1 << 30  # bytes of address space (RLIMIT_AS)
    file_size: int = 16 << 20  # bytes per file written, stdout and stderr included (RLIMIT_FSIZE)
    processes: int = 0  # RLIMIT_NPROC


@dataclass
class RunResult:
    status: str  # "passed" (exit 0), "failed" (other exit), "timeout", "killed" (by a signal)
    returncode: Optional[int]
    seconds: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def reason(self) -> str:
        """One line on why a program failed: its exception, or how it was stopped."""
        if self.status == "timeout":
            return "timed out"
        if self.status == "killed":
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"  # SIGXCPU: its CPU limit
            except ValueError:
                return f"killed by signal {-self.returncode}"
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ("" if self.passed else f"exit status {self.returncode}")


def run_python(source: str, limits: Limits = Limits()) -> RunResult:
    """Run ``source`` as ``program.py`` in a fresh sandbox and wait for it (or the deadline)."""
    return _run(source, limits, probe=False)


def _run(source: str, limits: Limits, probe: bool) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="ifp-sandbox-") as private:
        # The child's folder is work/; its stdout and stderr are files beside it, out of its reach.
        work = Path(private) / "work"
        work.mkdir(mode=0o700)
        (work / "program.py").write_text(source, encoding="utf-8")
        settings = {"memory": limits.memory, "cpu": limits.cpu, "processes": limits.processes,
                    "file_size": limits.file_size, "probe": probe}
        command = [*_isolation_prefix(work), sys.executable, "-I", "-B", "-c", RUNNER.read_text(), json.dumps(settings)]
        with open(Path(private) / "stdout", "w+b") as out, open(Path(private) / "stderr", "w+b") as err:
            start = time.perf_counter()
            child = subprocess.Popen(command, cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     start_new_session=True)
            try:
                returncode = child.wait(timeout=limits.seconds)
                status = "passed" if returncode == 0 else "killed" if returncode < 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(child)
                returncode, status = None, "timeout"
            seconds = time.perf_counter() - start
            _kill_group(child)  # anything it left running in its session
            return RunResult(status, returncode, seconds, _tail(out), _tail(err))


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - TAIL_BYTES))
    return f.read().decode("utf-8", errors="replace")


def _isolation_prefix(work: Path) -> list[str]:
    """The command that puts the child in the OS's sandbox, if this OS has one we can use."""
    if sys.platform.startswith("linux") and network_namespace():
        return [shutil.which("unshare"), "-rn", "--"]
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        return ["sandbox-exec", "-p", MACOS_PROFILE.format(folder=os.path.realpath(work))]
    return []


@functools.lru_cache(maxsize=None)
def network_namespace() -> bool:
    """Whether ``unshare -rn`` works here (user namespaces may be disabled, or a container may forbid them)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=None)
def sandbox_report() -> dict:
    """What isolates generated code on this machine, checked by starting one sandbox.

    Raises IFPError when the sandbox cannot start a trivial program: every
    HumanEval problem would then fail, and a score of 0 would be a lie.
    """
    probe = _run("", Limits(), probe=True)
    if not probe.passed:
        raise IFPError(f"the code sandbox does not start here ({probe.reason}): HumanEval cannot be scored")
    child = json.loads(probe.stdout.strip().splitlines()[-1])
    if sys.platform.startswith("linux"):
        network = "network namespace (unshare -rn)" if network_namespace() else (
            "Landlock: no TCP connect/bind" if child["landlock"] >= 4 else "none")
        files = f"Landlock ABI {child['landlock']}: writes only in its folder" if child["landlock"] else "audit hook only"
    elif sys.platform == "darwin" and shutil.which("sandbox-exec"):
        network, files = "sandbox-exec: denied", "sandbox-exec: writes only in its folder"
    else:
        network, files = "none", "audit hook only"
    return {"platform": sys.platform, "network": network, "files": files, "rlimits": child["rlimits"],
            "limits": asdict(Limits()), "environment": "empty", "folder": "private temporary"}
