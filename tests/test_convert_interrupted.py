"""A convert stopped halfway, or into a full disk, leaves nothing behind.

Real ``ifp convert`` processes: SIGTERM (what ``timeout`` and CI send) is
cleaned up by the process itself; SIGKILL cannot be, so the next convert into
the same folder removes what a dead process left, and never what a live one
is writing. Full disks are real small filesystems (tmpfs in a user and mount
namespace: ``unshare -rm``, which root and unprivileged users on Linux both
have).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ifp_mlx.convert import ConvertOptions, convert
from ifp_mlx.convert.random_model import random_llama_config, write_random_hf_folder
from ifp_mlx.errors import IFPError
from ifp_mlx.files import STALE_S, atomic_file, remove_abandoned

IFP = str(Path(sys.executable).with_name("ifp"))
WAIT_S = 120.0  # for a process to reach a state; never reached unless something is broken


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    """A random llama whose convert writes about 100 MB: long enough to be caught mid-write."""
    folder = tmp_path_factory.mktemp("big") / "hf"
    write_random_hf_folder(folder, random_llama_config(hidden=512, d_ff=2048, layers=8, vocab=512))
    return folder


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> Path:
    """A random llama of about 7 MB converted."""
    folder = tmp_path_factory.mktemp("small") / "hf"
    write_random_hf_folder(folder, random_llama_config(hidden=256, d_ff=1024, layers=2, vocab=512))
    return folder


def temporaries(parent: Path, name: str = "out") -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


def wait_for(condition, what: str) -> None:
    """Poll until ``condition()`` holds (the child gets there by itself; this only watches)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.002)


def start_convert(src: Path, out: Path) -> subprocess.Popen:
    """``ifp convert`` in its own process, caught once its temporary folder exists."""
    child = subprocess.Popen([IFP, "convert", str(src), str(out)], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: temporaries(out.parent) or child.poll() is not None, "the temporary folder")
    assert child.poll() is None and not out.exists(), "the convert finished before it could be stopped"
    return child


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_mid_convert_leaves_nothing(big_hf, tmp_path, sig):
    """SIGTERM as ``timeout`` and CI send, SIGHUP as a closed terminal, Ctrl+C."""
    child = start_convert(big_hf, tmp_path / "out")
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=WAIT_S)
    assert child.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr, stderr
    assert sorted(tmp_path.iterdir()) == []


def test_the_next_convert_removes_what_a_killed_one_left(big_hf, tmp_path):
    out = tmp_path / "out"
    child = start_convert(big_hf, out)
    child.kill()  # SIGKILL: nothing runs in the child
    child.communicate(timeout=WAIT_S)
    left = temporaries(tmp_path)
    assert [p.name for p in left] == [f".out.tmp-{child.pid}"]
    convert(big_hf, out, ConvertOptions(dtype="float16"))
    assert temporaries(tmp_path) == [] and (out / "config.json").exists()


def test_a_live_convert_keeps_its_folder(small_hf, tmp_path):
    """A process still writing (here: holding its folder open and waiting) is left alone;
    once it is killed, its folder goes at the next convert."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys\nfrom ifp_mlx.files import atomic_folder\n"
            f"with atomic_folder({str(out)!r}) as tmp:\n"
            "    (tmp / 'part').write_bytes(b'x')\n    print('ready', flush=True)\n    sys.stdin.read()\n"
            "    raise SystemExit(1)\n"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        theirs = tmp_path / f".out.tmp-{holder.pid}"
        convert(small_hf, out, ConvertOptions(force=True))
        assert (theirs / "part").exists(), "a live process's folder was removed"
    finally:
        holder.kill()
        holder.communicate(timeout=WAIT_S)
    convert(small_hf, out, ConvertOptions(force=True))
    assert temporaries(tmp_path) == []


def test_an_unlocked_folder_goes_when_its_pid_is_dead_or_it_is_old(tmp_path):
    """Folders of older ifp versions hold no lock: a dead PID, or an age no live owner
    reaches unlocked (its PID was given to another process since), tells."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f".out.tmp-{int(dead.stdout)}"
    reused = tmp_path / f".out.tmp-{os.getppid()}"  # alive, and not an ifp writing here
    fresh = tmp_path / f".other.tmp-{os.getppid()}"
    for folder in (gone, reused, fresh):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"x")
    assert remove_abandoned(tmp_path, ".out.tmp-") == [gone]
    old = time.time() - 2 * STALE_S
    os.utime(reused, (old, old))
    assert remove_abandoned(tmp_path, ".out.tmp-") == [reused]
    assert remove_abandoned(tmp_path, ".other.tmp-") == [] and fresh.exists()


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------


def convert_on_tmpfs(src: Path, mount: Path, options: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``ifp convert SRC MOUNT/out`` on a fresh tmpfs mounted at ``mount`` with ``options``,
    in a user and mount namespace; returns the result and what is left on the tmpfs."""
    mount.mkdir()
    script = (
        f'mount -t tmpfs -o {options} none "$1" || exit 99; '
        '"$2" convert "$3" "$1/out" >/dev/null; rc=$?; ls -A "$1"; exit $rc'
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(mount), IFP, str(src)],
        capture_output=True, text=True, timeout=WAIT_S,
    )
    left = result.stdout.split()
    assert result.returncode != 99, f"could not mount a tmpfs here: {result.stderr}"
    return result, left


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_disk_too_small_is_refused_before_writing(small_hf, tmp_path):
    result, left = convert_on_tmpfs(small_hf, tmp_path / "disk", "size=2M")
    line = one_line_error(result)
    assert f"not enough space for {tmp_path / 'disk' / 'out'}: it needs about" in line, line
    assert "2.1 MB free there" in line, line
    assert left == []


def test_a_disk_that_fills_while_writing_is_one_line_and_leaves_nothing(small_hf, tmp_path):
    """Room for the bytes, not for the files: the third file of the model folder cannot be made."""
    result, left = convert_on_tmpfs(small_hf, tmp_path / "disk", "size=64M,nr_inodes=4")
    line = one_line_error(result)
    assert f"could not write {tmp_path / 'disk' / 'out'}: no space left on device (it needs about" in line, line
    assert left == []


def test_a_file_size_limit_is_one_line_and_leaves_nothing(small_hf, tmp_path):
    """EFBIG (a filesystem's or ``ulimit -f``'s largest file) while writing the bank."""
    result = subprocess.run(
        ["sh", "-c", 'ulimit -f 2048 && exec "$0" convert "$1" "$2"', IFP, str(small_hf), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=WAIT_S,
    )
    line = one_line_error(result)
    assert f"could not write {tmp_path / 'out'}: file too large" in line, line
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["file/x.json", "/proc/ifp-test.json"])
def test_a_file_that_cannot_be_written_is_one_line_before_the_block_runs(tmp_path, where):
    """atomic_file creates its temporary file first: a place that cannot be written
    (a file where the folder would be, a filesystem that takes no new files) is refused
    naming the path, and the block (the writer) never runs."""
    (tmp_path / "file").write_text("")
    target = tmp_path / where
    ran = []
    with pytest.raises(IFPError, match=f"cannot write {re.escape(str(target))}: "):
        with atomic_file(target):
            ran.append(True)
    assert ran == [] and os.listdir(tmp_path) == ["file"]
