"""Run untrusted Python (a model's code) in a separate, isolated process.

Generated code never runs in the ifp process. Each program gets a child
``python -I -B`` in a private temporary folder with an empty environment,
under layers that each hold on their own, outermost first:

1. a uid of no one's, and namespaces (bubblewrap), or ``sandbox-exec`` on
   macOS (``sandbox_layers.py``);
2. a seccomp filter refusing sockets, new processes, exec, tracing, mounts and
   xattr writes (``seccomp_filter.py``);
3. rlimits and Landlock, then an audit hook whose settings the program cannot
   reach (``sandbox_runner.py``).

The child is killed at a wall-clock deadline. A run passes only when the
program and its tests ran to their end: the runner then writes a random nonce
to a pipe only the parent reads; exit status 0 without it (``os._exit(0)``)
is an early exit, and a failure.

``sandbox_report()`` says which layers took effect on this machine; the
evaluation records it beside its results and refuses to score where no kernel
layer did.
"""

import functools
import json
import os
import secrets
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
from .sandbox_layers import INSIDE_ID, Plan, detect
from .seccomp_filter import compile_filter, denied

RUNNER = Path(__file__).with_name("sandbox_runner.py")
TAIL_BYTES = 2000  # of stdout/stderr kept in a result
NONCE_BYTES = 16
KERNEL_LAYERS = ("uid", "namespaces", "seccomp", "landlock", "sandbox-exec")


@dataclass(frozen=True)
class Limits:
    """What one program may use. ``processes`` 0: no new processes or threads
    (refused by the seccomp filter, RLIMIT_NPROC and the audit hook)."""

    seconds: float = 10.0  # wall clock
    cpu: int = 10  # CPU seconds (RLIMIT_CPU)
    memory: int = 1 << 30  # bytes of address space (RLIMIT_AS)
    file_size: int = 16 << 20  # bytes per file written, stdout and stderr included (RLIMIT_FSIZE)
    processes: int = 0  # RLIMIT_NPROC


@dataclass
class RunResult:
    status: str  # "passed" (ran to its end), "failed", "timeout", "killed" (by a signal)
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
        if self.status == "failed" and self.returncode == 0:  # os._exit(0), or the marker's pipe closed
            return "exited before its tests completed (exit status 0)"
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ("" if self.passed else f"exit status {self.returncode}")


def run_python(source: str, limits: Limits = Limits(), tests: Optional[str] = None) -> RunResult:
    """Run ``source`` as ``program.py`` in a fresh sandbox, then ``tests`` (compiled on their own) in
    its namespace, and wait for it (or the deadline). It passes only if both ran to their end."""
    pieces = [("program.py", source)] + ([("tests.py", tests)] if tests is not None else [])
    return run_under(detect(), pieces, limits)


def run_under(plan: Plan, pieces: list, limits: Limits, probe: bool = False) -> RunResult:
    """One run of ``pieces`` ((file name, source) pairs) under ``plan``'s layers; ``probe``: the runner
    reports what took effect instead of running anything. Tests pass a plan with a layer taken away."""
    nonce = secrets.token_hex(NONCE_BYTES)
    seccomp = compile_filter(limits.processes > 0) if plan.seccomp else None
    job = {"limits": asdict(limits), "probe": probe, "nonce": nonce, "pieces": pieces, "landlock": plan.landlock,
           "seccomp": seccomp.hex() if seccomp else None}
    with tempfile.TemporaryDirectory(prefix="ifp-sandbox-") as private:
        # The child's folder is work/; its stdout and stderr are files beside it, out of its reach.
        work = Path(private) / "work"
        work.mkdir(mode=0o700)
        # for tracebacks only (the runner runs the job's copy); a lone surrogate from a tokenizer is no traceback here
        (work / "program.py").write_text(pieces[0][1] if pieces else "", encoding="utf-8", errors="replace")
        plan.prepare(Path(private), work)
        with tempfile.TemporaryFile() as job_file, open(Path(private) / "stdout", "w+b") as out, \
                open(Path(private) / "stderr", "w+b") as err:
            job_file.write(json.dumps(job).encode())
            job_file.seek(0)
            returncode, seconds, marker = _wait(plan, work, limits, job_file.fileno(), out, err)
            status = ("timeout" if returncode is None else "killed" if returncode < 0 else
                      "passed" if returncode == 0 and marker == nonce.encode() else "failed")
            return RunResult(status, returncode, seconds, _tail(out), _tail(err))


def _wait(plan: Plan, work: Path, limits: Limits, job: int, out, err) -> tuple[Optional[int], float, bytes]:
    """Start the child, wait for it or the deadline, and leave nothing of it running.

    Returns its exit status (None at the deadline), the seconds it ran, and
    what it wrote to the marker pipe, whose other end only this process holds.
    """
    done_read, done_write = os.pipe()
    try:
        argv = [plan.interpreter, "-I", "-B", "-c", RUNNER.read_text(), str(job), str(done_write)]
        start = time.perf_counter()
        child = subprocess.Popen(plan.command(work, argv), cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=err, start_new_session=True, pass_fds=(job, done_write))
        os.close(done_write)
        done_write = -1
        try:
            returncode = plan.exit_status(child.wait(timeout=limits.seconds))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # at the deadline, after it, or on Ctrl-C: nothing of it keeps running
            seconds = time.perf_counter() - start
            _kill_group(child)  # its session (bwrap's PID namespace ends the rest)
        return returncode, seconds, _read_marker(done_read)
    finally:
        os.close(done_read)
        if done_write >= 0:
            os.close(done_write)


def _read_marker(fd: int) -> bytes:
    """What the runner wrote to the marker pipe, without waiting: the child is gone."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 2 * NONCE_BYTES + 1)
    except BlockingIOError:  # a descendant still holds the pipe, and nothing was written
        return b""


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


@functools.lru_cache(maxsize=None)
def sandbox_report() -> dict:
    """Which layers isolate generated code on this machine (see ``report``)."""
    return report(detect())


def report(plan: Plan) -> dict:
    """Which of ``plan``'s layers took effect, checked by starting one sandbox.

    Raises IFPError when the sandbox cannot start a trivial program (every
    HumanEval problem would then fail, and a score of 0 would be a lie), or
    when no kernel layer took effect (the audit hook alone can be switched off
    by a program that sets out to).
    """
    probe = run_under(plan, [], Limits(), probe=True)
    if not probe.passed:
        raise IFPError(f"the code sandbox does not start here ({probe.reason}): HumanEval cannot be scored")
    child = json.loads(probe.stdout.strip().splitlines()[-1])
    layers = describe(plan, child)
    kernel = [name for name in KERNEL_LAYERS if name in layers and not layers[name].startswith("none")]
    if not kernel:
        raise IFPError("no kernel layer of the code sandbox took effect here (no bwrap, seccomp or Landlock; see "
                       "docs/SECURITY.md): HumanEval is not scored behind the audit hook alone")
    return {"platform": sys.platform, "kernel_layers": kernel, "layers": layers,
            "interpreter": f"{plan.interpreter} (Python {child['python']})", "limits": asdict(Limits()),
            "environment": "empty", "folder": "private temporary"}


def describe(plan: Plan, child: dict) -> dict:
    """One line per layer saying what it does here, or "none: why"."""
    hook = "first layer: no writes outside, processes, sockets or ctypes; settings out of reach"
    if sys.platform == "darwin":
        return {"sandbox-exec": "no network, writes only in its folder" if plan.seatbelt else "none: not found",
                "rlimits": ", ".join(child["rlimits"]), "audit hook": hook}
    no_bwrap = "bwrap does not start here" if shutil.which("bwrap") else "no bwrap: apt-get install bubblewrap"
    layers = {}
    layers["uid"] = (f"{plan.uid} outside (no user's), {INSIDE_ID} inside, no groups" if plan.uid is not None else
                     f"none: runs as ifp's uid {child['uid']}" + ("" if os.geteuid() == 0 else " (ifp is not root)"))
    layers["namespaces"] = (
        "bubblewrap: own user, mount, PID, network, IPC, UTS namespaces; root read-only; private /tmp, /var/tmp, /run, /dev"
        if plan.bwrap else f"network namespace only (unshare -rn; {no_bwrap})" if plan.unshare else f"none: {no_bwrap}")
    layers["seccomp"] = (f"libseccomp filter: {len(denied(False))} system calls refused" if child["seccomp"] else
                         "none: not asked for" if not plan.seccomp else "none: libseccomp or pyseccomp missing"
                         if compile_filter(False) is None else "none: the kernel refused the filter")
    layers["landlock"] = (f"ABI {child['landlock']}: writes only in its folder, no TCP, no signals out"
                          if child["landlock"] else "none: this kernel has no Landlock" if plan.landlock else
                          "none: not asked for")
    layers["rlimits"] = ", ".join(child["rlimits"])
    layers["audit hook"] = hook
    return layers
