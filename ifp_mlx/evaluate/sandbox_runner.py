"""The first code the sandbox's child process runs, before the program under test.

It is never imported by ifp: the parent passes this file's text to a fresh
``python -I -B -c`` in a private working folder with an empty environment
(see ``sandbox.py``). Standard library only. In order, it

1. sets the resource limits (address space, CPU seconds, processes, file size,
   no core dumps), so a runaway program is stopped by the kernel;
2. on Linux with Landlock, lets the process write only beneath its working
   folder (reads stay allowed), refuses TCP bind/connect, and (Landlock ABI 6)
   keeps it from signalling processes outside the sandbox: the kernel enforces
   this, whatever the program does;
3. adds an audit hook (every OS) refusing writes outside the folder, new
   processes, sockets, signals and ctypes: the guard where the OS has no
   Landlock, and a second one where it does;
4. runs ``program.py`` from the working folder as ``__main__``.

An audit hook alone can be bypassed by a program that sets out to (through
interpreter internals); it stops accidents, and the kernel-side guards stop
the rest where the OS has them.
"""

import json
import os
import resource
import sys

# Landlock (linux/landlock.h)
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446  # the same on every architecture
RULESET_VERSION, RULE_PATH_BENEATH, PR_SET_NO_NEW_PRIVS = 1, 1, 38
WRITE_FILE, TRUNCATE = 1 << 1, 1 << 14
WRITE_ACCESS_V1 = WRITE_FILE | sum(1 << bit for bit in range(4, 13))  # remove, make dir/file/sym/...
REFER = 1 << 13
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1

REFUSED_EVENTS = (
    "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.kill", "os.killpg", "subprocess.Popen",
    "pty.spawn", "signal.pthread_kill", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.addressof",
)
REFUSED_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
PATH_EVENTS = {  # event -> positions of the paths it writes
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (1,),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def set_limits(limits: dict) -> list[str]:
    """Apply the rlimits; returns the names the OS accepted (macOS refuses some)."""
    wanted = {
        "RLIMIT_AS": (limits["memory"], limits["memory"]),
        "RLIMIT_CPU": (limits["cpu"], limits["cpu"] + 1),  # SIGXCPU, then SIGKILL a second later
        "RLIMIT_NPROC": (limits["processes"], limits["processes"]),
        "RLIMIT_FSIZE": (limits["file_size"], limits["file_size"]),
        "RLIMIT_CORE": (0, 0),
    }
    applied = []
    for name, value in wanted.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            resource.setrlimit(which, value)
            applied.append(name)
        except (ValueError, OSError):
            pass
    return applied


def landlock(folder: str) -> int:
    """Writes only beneath ``folder`` (and /dev/null), no TCP, no signals out: the Landlock ABI used, 0 if none."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(CREATE_RULESET, None, ctypes.c_size_t(0), RULESET_VERSION)
    if abi < 1:
        return 0
    handled = WRITE_ACCESS_V1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    attr = (ctypes.c_uint64 * 3)(handled, NET_BIND_TCP | NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_access = WRITE_FILE | (TRUNCATE if abi >= 3 else 0)
    for path, access in ((folder, handled), (os.devnull, file_access)):
        fd = os.open(path, getattr(os, "O_PATH", 0o10000000) | os.O_CLOEXEC)
        rule = PathBeneath(access, fd)
        added = libc.syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        os.close(fd)
        if added != 0:
            return 0
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(RESTRICT_SELF, ruleset, 0) != 0:
        return 0
    os.close(ruleset)
    return abi


def audit_guard(folder: str) -> None:
    """Refuse, from Python, what the program has no business doing (see the module docstring)."""
    root = os.path.realpath(folder)

    def inside(path) -> bool:
        if isinstance(path, int):  # an already open descriptor (stdout, a pipe)
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: no writing outside the working folder ({path!r})")
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: no {event} outside the working folder ({args[i]!r})")
        elif event in REFUSED_EVENTS or event.startswith(REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    limits = json.loads(sys.argv[1])
    folder = os.getcwd()
    applied = set_limits(limits)
    abi = landlock(folder)
    audit_guard(folder)
    if limits.get("probe"):
        print(json.dumps({"rlimits": applied, "landlock": abi}))
        return
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    sys.argv = ["program.py"]
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
