"""Helpers of the sandbox tests: a target the sandbox can see, one layer run alone, processes by a token."""

import contextlib
import os
import secrets
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from ifp_mlx.evaluate.sandbox_layers import Plan

CACHE = Path(__file__).parent / ".cache"


@contextlib.contextmanager
def visible_target() -> Iterator[Path]:
    """A file anyone may write, in a folder anyone may write, outside every private mount of the sandbox
    (the project's test cache, not /tmp): an attack on it reaches the file and must be stopped there."""
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sandbox-target-", dir=CACHE) as folder:
        os.chmod(folder, 0o777)
        target = Path(folder) / "target.txt"
        target.write_text("untouched")
        os.chmod(target, 0o666)
        os.utime(target, (1_000_000_000, 1_000_000_000))
        yield target


def xattrs(path: Path) -> list[str]:
    try:
        return os.listxattr(path)
    except OSError:  # a filesystem without extended attributes
        return []


@contextlib.contextmanager
def folder(plan: Plan) -> Iterator[Path]:
    """A private working folder as the sandbox makes one, reachable by the plan's uid."""
    with tempfile.TemporaryDirectory(prefix="ifp-sandbox-test-") as private:
        work = Path(private) / "work"
        work.mkdir(mode=0o700)
        plan.prepare(Path(private), work)
        yield work


def outer_only(plan: Plan, work: Path, code: str) -> subprocess.CompletedProcess:
    """``code`` under the plan's outer layers alone (uid, namespaces): no runner, so no seccomp, rlimits,
    Landlock or audit hook."""
    argv = plan.command(work, [plan.interpreter, "-I", "-c", code])
    return subprocess.run(argv, cwd=work, env={}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)


def token() -> str:
    """A sleep length no other process on this machine has in its command line."""
    return f"41.{secrets.randbelow(10**9)}"


def processes_with(mark: str) -> list[int]:
    """The host's live processes whose command line contains ``mark`` (zombies have none)."""
    if not os.path.isdir("/proc/self"):  # macOS
        listing = subprocess.run(["ps", "-A", "-o", "pid=,command="], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in listing.splitlines() if mark in line]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if mark.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found
