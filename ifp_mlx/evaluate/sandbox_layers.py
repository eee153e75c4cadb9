"""The sandbox's outer layers: what this machine offers, and the command line that applies them.

On Linux, in the order a program meets them from outside in:

- **a uid of no one's.** When ifp runs as root, the child runs as a uid (and
  gid) in no passwd or group entry that owns nothing, with no supplementary
  groups (util-linux's ``setpriv`` switches): outside the sandbox it may do only
  what any stranger may. The
  sandbox then needs an interpreter every user can reach; a root-only one (a
  pyenv under /root) is replaced by the system's ``python3``.
- **namespaces, by bubblewrap.** ``bwrap`` (maintained by the Flatpak
  project, used by Flatpak, in Debian and every major distribution) puts the
  child in its own user, mount, PID, network, IPC and UTS namespaces: the host
  root read-only, private ``/tmp``, ``/var/tmp``, ``/run``, ``/dev`` and ``/dev/shm`` (so no
  Unix socket of the host is reachable), only its folder writable, no nested
  user namespaces, and when the first process ends the kernel ends every
  process in the PID namespace. Without bwrap, ``unshare -rn`` still gives a
  network namespace.
- **macOS:** ``sandbox-exec`` with a profile denying all network and every
  write outside the folder.

The seccomp filter, rlimits, Landlock and the audit hook are applied inside by
the runner (``sandbox_runner.py``).
"""

import dataclasses
import functools
import os
import grp
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FIRST_UID = 2_000_000_123  # far above any login or container range; uid maps refuse some higher values
INSIDE_ID = 1000  # what the child sees as its uid and gid
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
NAMESPACES = ("--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
              "--unshare-cgroup-try")
PRIVATE = ("/tmp", "/run", "/var/tmp")  # where the host keeps sockets and shared files: empty in the sandbox
PRIVATE_SIZE = 64 << 20  # bytes each private tmpfs may hold, where bwrap supports --size
MACOS_PROFILE = """(version 1)
(allow default)
(deny network*)
(deny file-write*)
(allow file-write* (subpath "{folder}") (literal "/dev/null"))
"""


@dataclass(frozen=True)
class Plan:
    """The outer layers one run gets. ``detect()`` gives this machine's; tests take one away with ``replace``."""

    interpreter: str
    uid: Optional[int] = None  # the child's uid and gid outside; None: ifp's own
    setpriv: str = "setpriv"  # util-linux's, which switches to ``uid``
    bwrap: Optional[str] = None
    bwrap_options: tuple[str, ...] = ()  # the options this bwrap version knows beyond the basic ones
    unshare: Optional[str] = None  # the fallback without bwrap: a network namespace only
    seatbelt: bool = False  # macOS sandbox-exec
    seccomp: bool = True  # load the seccomp filter, where libseccomp is here
    landlock: bool = True  # apply Landlock, where the kernel has it

    def prepare(self, private: Path, work: Path) -> None:
        """Let the sandbox's uid reach its folder (and only that: its output files stay root's, mode 0600)."""
        if self.uid is None:
            return
        private.chmod(0o711)
        for path in (work, *work.iterdir()):
            os.chown(path, self.uid, self.uid)

    def command(self, work: Path, argv: list[str]) -> list[str]:
        """``argv`` (the interpreter and the runner) wrapped in this plan's isolation."""
        return [*self._as_uid(), *self._isolation(work), *argv]

    def _as_uid(self) -> list[str]:
        """setpriv switches to the sandbox's uid in the child, after ``fork``: ``Popen(user=...)``
        would make Python fork instead of vfork, and OpenBLAS's fork handler can then
        deadlock a process whose BLAS threads have run (it hung the test suite)."""
        if self.uid is None:
            return []
        return [self.setpriv, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--"]

    def _isolation(self, work: Path) -> list[str]:
        if self.bwrap:
            return [self.bwrap, *bwrap_arguments(work, self.bwrap_options), "--"]
        if self.unshare:
            return [self.unshare, "-rn", "--"]
        if self.seatbelt:
            return ["sandbox-exec", "-p", MACOS_PROFILE.format(folder=os.path.realpath(work))]
        return []

    def exit_status(self, returncode: int) -> int:
        """The child's status as Popen reports it: bwrap passes a death by signal N on as 128 + N."""
        if self.bwrap and 128 < returncode <= 128 + 64:
            return 128 - returncode
        return returncode


def bwrap_arguments(work: Path, extra: tuple[str, ...]) -> list[str]:
    """The namespaces and the mount table (see the module docstring); ``work`` is the one writable folder."""
    size = ["--size", str(PRIVATE_SIZE)] if "--size" in extra else []
    mounts = [path for path in PRIVATE if os.path.isdir(path) and not os.path.islink(path)]  # tmpfs needs a folder
    private = [arg for path in mounts for arg in (*size, "--tmpfs", path)]
    folder = str(work)
    return [
        *NAMESPACES, *(["--disable-userns"] if "--disable-userns" in extra else []),
        "--die-with-parent", "--new-session", "--clearenv",
        "--ro-bind", "/", "/", *private,
        "--dev", "/dev", "--proc", "/proc",
        "--bind", folder, folder, "--chdir", folder, "--uid", str(INSIDE_ID), "--gid", str(INSIDE_ID),
    ]


@functools.lru_cache(maxsize=None)
def detect() -> Plan:
    """The layers this machine offers, each tried once for real (a container may forbid namespaces)."""
    if sys.platform == "darwin":
        return Plan(sys.executable, seatbelt=shutil.which("sandbox-exec") is not None)
    if not sys.platform.startswith("linux"):
        return Plan(sys.executable)
    setpriv = shutil.which("setpriv")
    uid = free_id() if os.geteuid() == 0 and setpriv else None
    interpreter = sys.executable if uid is None else reachable_interpreter()
    if interpreter is None:  # no Python a stranger could run: keep ifp's uid rather than no sandbox
        uid, interpreter = None, sys.executable
    plan = Plan(interpreter, uid, setpriv or "setpriv")
    bwrap = shutil.which("bwrap")
    if bwrap:
        with_bwrap = dataclasses.replace(plan, bwrap=bwrap, bwrap_options=bwrap_options(bwrap))
        if starts(with_bwrap):
            return with_bwrap
    unshare = shutil.which("unshare")
    if unshare and starts(dataclasses.replace(plan, unshare=unshare)):
        return dataclasses.replace(plan, unshare=unshare)
    return plan


def free_id() -> Optional[int]:
    """The first id from FIRST_UID that is neither a user's nor a group's."""
    for candidate in range(FIRST_UID, FIRST_UID + 1000):
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
        except KeyError:
            return candidate
    return None


def reachable_interpreter() -> Optional[str]:
    """ifp's own Python if any user can run it and read its library, else the system's python3; by its real
    path, which is the one checked (the runner needs only the standard library, not ifp's environment)."""
    own = os.path.realpath(sys.executable)  # a venv's python may sit in a folder strangers cannot enter
    if others_can_reach(own, execute=True) and others_can_reach(sysconfig.get_paths()["stdlib"], execute=False):
        return own
    for candidate in map(os.path.realpath, SYSTEM_PYTHONS):
        if os.path.exists(candidate) and others_can_reach(candidate, execute=True):
            return candidate
    return None


def others_can_reach(path: str, execute: bool) -> bool:
    """Whether the mode bits let a user who is neither owner nor group open ``path``: every folder above
    searchable, the file itself executable (``execute``) or readable."""
    target = Path(os.path.realpath(path))
    try:
        for folder in reversed(target.parents):
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return False
        return bool(os.stat(target).st_mode & (stat.S_IXOTH if execute else stat.S_IROTH))
    except OSError:
        return False


def bwrap_options(bwrap: str) -> tuple[str, ...]:
    """The newer options this bwrap knows (0.8 added ``--disable-userns`` and ``--size``)."""
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(option for option in ("--disable-userns", "--size") if option in text)


def starts(plan: Plan) -> bool:
    """Whether a plan's isolation starts a trivial Python here (user namespaces may be off, or forbidden)."""
    with tempfile.TemporaryDirectory(prefix="ifp-sandbox-") as private:
        work = Path(private) / "work"
        work.mkdir(mode=0o700)
        plan.prepare(Path(private), work)
        argv = plan.command(work, [plan.interpreter, "-I", "-S", "-c", "pass"])
        try:
            done = subprocess.run(argv, env={}, stdin=subprocess.DEVNULL, capture_output=True, timeout=20, cwd=work)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0
