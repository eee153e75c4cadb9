"""The seccomp filter of the code sandbox: system calls generated code never needs.

ifp compiles the filter here (libseccomp, through ``pyseccomp``'s ctypes
bindings, which keep libseccomp's own Python API) and hands the BPF program to
the sandbox's runner, which loads it before any generated code runs. Once
loaded, the kernel refuses these calls for the process and everything it could
start, whatever the program does in Python: a filter can be added to, never
removed.

A deny list rather than an allow list: Python's start-up and standard library
use a wide and changing set of calls, and an allow list that missed one would
fail programs that are right. The list is what an escape needs: sockets (Unix
ones on disk included), new processes and programs, tracing and reading other
processes, namespaces and mounts, the kernel's keyrings, BPF, io_uring (which
performs calls without passing through the filter) and extended attributes.
Calls of other architectures (32-bit ``int 0x80``, x32) kill the process:
libseccomp's default for a filter built for the native one only.
"""

import errno
import functools
import platform
import tempfile
from typing import Optional

NETWORK = ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4")
EXEC = ("execve", "execveat")
PROCESSES = ("fork", "vfork", "clone")  # clone3 gets ENOSYS below, so that a C library falls back to clone
OTHER_PROCESSES = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp")
NAMESPACES = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
)
KERNEL = (
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "syslog", "open_by_handle_at", "fanotify_init", "quotactl", "personality",
)
XATTR_WRITES = ("setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr")
# Calls newer than some libseccomp releases know by name. Since Linux 5.1 a new call has one number on every
# architecture but alpha and the MIPS ABIs; these are used only on the two below.
NEWER = {"setxattrat": 463, "removexattrat": 466, "open_tree_attr": 467, "file_setattr": 469}
UNIFIED_NUMBERS = ("x86_64", "aarch64")


def denied(processes: bool) -> tuple[str, ...]:
    """Every call the filter refuses; ``processes``: new processes are allowed (``Limits.processes`` > 0)."""
    return (NETWORK + EXEC + OTHER_PROCESSES + NAMESPACES + KERNEL + XATTR_WRITES + ("clone3",) + tuple(NEWER)
            + (() if processes else PROCESSES))


@functools.lru_cache(maxsize=None)
def compile_filter(processes: bool) -> Optional[bytes]:
    """The filter as a BPF program, or None where libseccomp or its bindings are missing (macOS, a bare Linux)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError):  # RuntimeError: the bindings found no libseccomp
        return None
    try:
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in denied(processes):
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            if number < 0:  # a name this libseccomp does not know
                if name not in NEWER or platform.machine() not in UNIFIED_NUMBERS:
                    continue
                number = NEWER[name]
            rules.add_rule(seccomp.ERRNO(errno.ENOSYS if name == "clone3" else errno.EPERM), number)
        with tempfile.TemporaryFile() as f:
            rules.export_bpf(f)
            f.seek(0)
            return f.read()
    except OSError:  # libseccomp refused the filter: no layer rather than a partial one
        return None
