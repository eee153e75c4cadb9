"""The first code the sandbox's child process runs, before the program under test.

It is never imported by ifp: the parent passes this file's text to a fresh
``python -I -B -c`` in a private working folder with an empty environment,
inside the namespaces ``sandbox.py`` sets up. Standard library only, and any
Python from 3.8: where ifp's own interpreter is out of the sandbox user's
reach, a system one runs it. Its arguments are two file descriptors: the job
(a JSON file: limits, sources, the seccomp filter, a random nonce) and the
marker, where it writes the nonce once the program and its tests completed.
In order, it

1. reads the job, so that nothing the program later writes in its folder can
   change the tests it will be scored by;
2. sets the resource limits (address space, CPU seconds, processes, file size,
   no core dumps), so a runaway program is stopped by the kernel;
3. on Linux with Landlock, lets the process write only beneath its working
   folder (reads stay allowed), refuses TCP bind/connect, and (Landlock ABI 6)
   keeps it from signalling processes outside the sandbox;
4. loads the seccomp filter compiled by the parent (``seccomp_filter.py``): the
   kernel then refuses sockets, new processes, exec, tracing, mounts, xattrs;
5. adds an audit hook (every OS) refusing writes outside the folder, new
   processes, sockets, signals and ctypes. Its settings are frozen inside the
   hook when it is made: nothing the program can name changes them;
6. runs the program, then the tests, as a fresh ``__main__`` module, and only
   then writes the nonce. A program that exits early, by ``exit()``,
   ``sys.exit``, ``raise SystemExit`` or ``os._exit``, never reaches that line,
   and the parent scores it a failure.

The audit hook alone can be bypassed by a program that sets out to (through
interpreter internals); it stops accidents, and the kernel layers stop the
rest. The program shares this process, so one that deliberately digs the
nonce out of the runner's memory could forge the marker: that is outside what
the verdict promises (see docs/SECURITY.md).
"""

import json
import os
import resource
import sys
import types

# Landlock (linux/landlock.h)
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446  # the same on every architecture
RULESET_VERSION, RULE_PATH_BENEATH, PR_SET_NO_NEW_PRIVS = 1, 1, 38
WRITE_FILE, TRUNCATE = 1 << 1, 1 << 14
WRITE_ACCESS_V1 = WRITE_FILE | sum(1 << bit for bit in range(4, 13))  # remove, make dir/file/sym/...
REFER = 1 << 13
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2

REFUSED_EVENTS = (
    "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.kill", "os.killpg", "subprocess.Popen",
    "pty.spawn", "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
    "socket.sendmsg", "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.addressof",
    "ctypes.call_function", "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # the hook's own closure
)
REFUSED_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
PATH_EVENTS = {  # event -> positions of the paths (or descriptors) it changes
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (1,),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,),
    "os.setxattr": (0,), "os.removexattr": (0,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
EARLY_EXIT = "sandbox: the program exited before its tests completed"


def read_job(fd: int) -> dict:
    """The whole job, read before the program exists."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def set_limits(limits: dict) -> list:
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


def libc():
    """The C library, for the two kernel calls Python has no wrapper for (Linux only)."""
    import ctypes

    library = ctypes.CDLL(None, use_errno=True)
    library.syscall.restype = ctypes.c_long
    return library


def no_new_privs() -> bool:
    """The process and its children can never gain privileges (setuid files): needed by Landlock and seccomp."""
    import ctypes

    zero = ctypes.c_ulong(0)
    return libc().prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) == 0


def landlock(folder: str) -> int:
    """Writes only beneath ``folder`` (and /dev/null), no TCP, no signals out: the Landlock ABI used, 0 if none."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    lib = libc()
    abi = lib.syscall(CREATE_RULESET, None, ctypes.c_size_t(0), RULESET_VERSION)
    if abi < 1:
        return 0
    handled = WRITE_ACCESS_V1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    attr = (ctypes.c_uint64 * 3)(handled, NET_BIND_TCP | NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = lib.syscall(CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_access = WRITE_FILE | (TRUNCATE if abi >= 3 else 0)
    for path, access in ((folder, handled), (os.devnull, file_access)):
        fd = os.open(path, getattr(os, "O_PATH", 0o10000000) | os.O_CLOEXEC)
        rule = PathBeneath(access, fd)
        added = lib.syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        os.close(fd)
        if added != 0:
            return 0
    if not no_new_privs() or lib.syscall(RESTRICT_SELF, ruleset, 0) != 0:
        return 0
    os.close(ruleset)
    return abi


def seccomp(program: bytes) -> bool:
    """Load the parent's compiled filter (a BPF program of 8-byte instructions); whether the kernel took it."""
    if not program or not sys.platform.startswith("linux") or not no_new_privs():
        return False
    import ctypes

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    code = ctypes.create_string_buffer(program, len(program))
    fprog = Fprog(len(program) // 8, ctypes.cast(code, ctypes.c_void_p))
    zero = ctypes.c_ulong(0)
    return libc().prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), zero, zero) == 0


def audit_guard(folder: str) -> None:
    """Refuse, from Python, what the program has no business doing (see the module docstring).

    Everything the hook consults is copied into its closure here, before the
    program runs: no module global, no ``__main__`` attribute, can switch it off.
    """
    root = os.path.realpath(folder)
    refused, prefixes, path_events = frozenset(REFUSED_EVENTS), REFUSED_PREFIXES, dict(PATH_EVENTS)
    write_flags, sep, devnull = WRITE_FLAGS, os.sep, os.devnull
    realpath, fsdecode, readlink = os.path.realpath, os.fsdecode, os.readlink  # not os's attributes, rebindable
    linux = sys.platform.startswith("linux")

    def inside(path, descriptors_ok: bool) -> bool:
        if isinstance(path, int):  # an open descriptor: fine to write to, but not to change the file it names
            if descriptors_ok:
                return True
            if not linux:
                return False
            try:
                path = readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        real = realpath(fsdecode(path))
        return real == root or real.startswith(root + sep) or real == devnull

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and not inside(path, True):
                raise PermissionError(f"sandbox: no writing outside the working folder ({path!r})")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and not inside(args[i], False):
                    raise PermissionError(f"sandbox: no {event} outside the working folder ({args[i]!r})")
        elif event in refused or event.startswith(prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def marker(fd: int, nonce: str):
    """What the runner calls once the tests completed: it writes the nonce the parent is waiting for."""
    write, close, data = os.write, os.close, nonce.encode()

    def done() -> None:
        write(fd, data)
        close(fd)

    return done


def run(pieces: list, done) -> None:
    """Run each piece (the program, then its tests) in one fresh ``__main__``, then report completion.

    Each piece is compiled on its own, so a program cannot swallow the tests
    (an unclosed string, say). An exit of any kind before the end is a failure.
    """
    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main  # `import __main__` gives the program's module, not the runner's
    sys.argv = ["program.py"]
    code = [compile(source, name, "exec") for name, source in pieces]
    try:
        for piece in code:
            exec(piece, main.__dict__)
    except SystemExit as stop:
        sys.stdout.flush()
        sys.stderr.write(f"{EARLY_EXIT} (SystemExit: {stop})\n")
        sys.stderr.flush()
        os._exit(1)  # not SystemExit: the program's atexit handlers do not get to run either
    sys.stdout.flush()
    done()


def main() -> None:
    job = read_job(int(sys.argv[1]))
    done = marker(int(sys.argv[2]), job.pop("nonce"))
    folder = os.getcwd()
    applied = set_limits(job["limits"])
    abi = landlock(folder) if job["landlock"] else 0
    filtered = seccomp(bytes.fromhex(job["seccomp"])) if job["seccomp"] else False
    audit_guard(folder)
    if job["probe"]:
        print(json.dumps({"rlimits": applied, "landlock": abi, "seccomp": filtered, "uid": os.getuid(),
                          "python": sys.version.split()[0]}))
        sys.stdout.flush()
        done()
        return
    run(job["pieces"], done)


if __name__ == "__main__":
    main()
