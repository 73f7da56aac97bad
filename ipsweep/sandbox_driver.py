"""Runs inside the sandbox process (python -I -S): confine itself, load the program, evaluate one expression.

Usage: sandbox_driver.py JOB.json, where JOB holds {"code", "expr", "limits", "tmp"}. Output, in tmp/result:
"ok\\n<repr of a plain value>" or "error\\n<exception name>". Only plain values (built-in types and a few
standard ones, no overridden __eq__) are reported, so an object that claims to equal anything cannot pass.
The expected value never enters this process: the harness compares. This file imports nothing from
ipsweep (it runs with -S, without site-packages).

Confinement, in order, before the program runs (each layer is enforced by the kernel; the program
runs in this same interpreter, so nothing it can reach here is trusted):
0. the harness's pids cgroup, when it made one (a process cap that holds for root too);
1. resource limits (CPU seconds, address space, file size, open files, core dumps);
2. Landlock (Linux >= 5.13): reads only beneath the Python install and a few files, writes only in
   tmp, no execve anywhere; from ABI 4 no TCP; from ABI 6 no signals to and no abstract-socket
   connections with processes outside this sandbox. Irrevocable: the program cannot lift it;
3. an audit hook that refuses forks, subprocesses, signals, sockets, ctypes and files outside the same
   roots with a clear error (Python-level: a determined program can get around it; the layers above hold).
The harness adds the outer layers: PID, network and mount namespaces and dropped capabilities.
"""

import collections
import ctypes
import json
import os
import resource
import sys

PLAIN = (int, float, complex, str, bytes, bool, type(None))
# compare with a dict as the dict they are
DICTS = (
    collections.Counter,
    collections.OrderedDict,
    collections.defaultdict,
)
BLOCKED_EVENTS = (
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "subprocess.Popen",
    "os.kill",
    "os.killpg",
    "pty.spawn",
    "ctypes.",
    "socket.",
    "sys.remote_exec",
    "os.setuid",
    "os.setgid",
)
BLOCKED_IMPORTS = frozenset(
    {
        "ctypes",
        "_ctypes",
        "_posixsubprocess",
        "subprocess",
        "multiprocessing",
        "_multiprocessing",
        "socket",
        "_socket",
        "ssl",
        "_ssl",
        "pty",
        "signal",
        "_signal",
        "resource",
        "faulthandler",
    }
)
WRITE_EVENTS = (
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.utime",
    "os.chdir",
    "shutil.",
)
READ_EVENTS = ("os.listdir", "os.scandir")  # the import system lists the stdlib's folders

# Landlock (include/uapi/linux/landlock.h). Syscall numbers 444-446 are the same on every architecture.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
PR_SET_NO_NEW_PRIVS = 38
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
FS_BY_ABI = {
    1: FS_ABI1,
    2: FS_ABI1 | 1 << 13,
    3: FS_ABI1 | 3 << 13,
    4: FS_ABI1 | 3 << 13,
}  # + refer, + truncate
FS_ALL = FS_ABI1 | 7 << 13  # + refer, truncate, ioctl_dev (ABI 5)
NET_TCP = 3  # bind_tcp | connect_tcp (ABI 4)
SCOPE_ALL = 3  # abstract_unix_socket | signal (ABI 6)
READ = FS_READ_FILE | FS_READ_DIR
# no exec, devices, sockets,
WRITE = FS_ALL & ~(FS_EXECUTE | 1 << 6 | 1 << 9 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 15)
# fifos or symlinks: the harness reads tmp/result and must find a plain file there


class RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def canon(v, depth=0):
    """A plain copy of v (raise TypeError for anything whose equality the harness cannot reproduce).

    Built-in containers and their subclasses that keep the base type's __eq__ (namedtuple, IntEnum)
    become the base value, read through the base type so an override of __iter__ cannot lie;
    collections' dict subclasses become dicts (Counter({1: 2}) == {1: 2} in Python too).
    Fraction, Decimal, deque, range and bytearray are kept: the harness rebuilds them and compares
    with Python's own semantics (Fraction(1, 2) == 0.5; deque([1]) != [1]).
    """
    if depth > 50:
        raise TypeError("value nested too deep")
    t = type(v)
    if t in PLAIN or t in (range, bytearray):
        return v
    if t is collections.deque:
        return collections.deque(canon(x, depth + 1) for x in v)
    for name, cls in (("fractions", "Fraction"), ("decimal", "Decimal")):
        module = sys.modules.get(name)
        if module is not None and t is getattr(module, cls, None):
            return v
    for base in (tuple, list, set, frozenset, dict, str, bytes, int, float):
        if isinstance(v, base) and (t.__eq__ is base.__eq__ or t in DICTS):
            if base is dict:
                return {canon(k, depth + 1): canon(x, depth + 1) for k, x in dict.items(v)}
            if base in (tuple, list, set, frozenset):
                return base(canon(x, depth + 1) for x in base.__iter__(v))
            return {str: str.__str__, bytes: bytes, int: int.__int__, float: float.__float__}[base](v)
    raise TypeError(f"not a plain value: {t.__name__}")


def landlock(tmp: str, readable: list[str]) -> str:
    """Restrict this process and its children for good; return what was applied."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return "no landlock (kernel without it)"
    fs = FS_BY_ABI.get(abi, FS_ALL)
    attr = RulesetAttr(fs, NET_TCP if abi >= 4 else 0, SCOPE_ALL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    for path, access in [(p, READ) for p in readable] + [(tmp, WRITE | READ)]:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # a path this system does not have
        allowed = (
            access & fs if os.path.isdir(path) else access & fs & (FS_READ_FILE | FS_WRITE_FILE | 1 << 14)
        )
        rule = PathBeneathAttr(allowed, pfd)
        if libc.syscall(SYS_ADD_RULE, fd, 1, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        os.close(pfd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(SYS_RESTRICT_SELF, fd, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(fd)
    return f"landlock ABI {abi}" + (
        "" if abi >= 6 else " (signals and abstract sockets not scoped before ABI 6)"
    )


def install_guard(tmp: str, readable: list[str]) -> None:
    """The audit hook: clear errors for what a model writes by accident, and the file policy again for
    systems without Landlock. Its state is taken into the closure now, but it runs in the program's own
    interpreter: a determined program can get around it. The kernel-enforced layers are the boundary."""
    blocked_events, blocked_imports, realpath = BLOCKED_EVENTS, BLOCKED_IMPORTS, os.path.realpath
    write_events, read_events, fsdecode, o_write = (
        WRITE_EVENTS,
        READ_EVENTS,
        os.fsdecode,
        os.O_WRONLY | os.O_RDWR | os.O_CREAT,
    )
    write_roots, read_roots = (tmp,), (tmp, *readable)

    def inside(path, roots) -> bool:
        p = realpath(fsdecode(path))
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def guard(event, args):
        if event.startswith(blocked_events):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in blocked_imports:
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            writes = any(c in str(args[1] or "r") for c in "wax+") or (args[2] or 0) & o_write
            if not inside(args[0], write_roots if writes else read_roots):
                raise PermissionError(
                    f"sandbox: {'writing' if writes else 'reading'} {args[0]} is not allowed"
                )
        if event.startswith(write_events) or event.startswith(read_events):
            roots = write_roots if event.startswith(write_events) else read_roots
            for a in args:
                if isinstance(a, (str, bytes)) and not inside(a, roots):
                    raise PermissionError(f"sandbox: {event} of {a} is not allowed")

    sys.addaudithook(guard)


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    tmp, lim = job["tmp"], job["limits"]
    os.chdir(tmp)
    mb = 1024 * 1024
    for res, value in (
        (resource.RLIMIT_CPU, lim["cpu_s"]),
        (resource.RLIMIT_AS, lim["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, lim["file_mb"] * mb),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ):
        # SIGXCPU at the budget, SIGKILL a second later
        hard = value + 1 if res == resource.RLIMIT_CPU else value
        resource.setrlimit(res, (value, hard))
    if os.getuid() != 0:  # the kernel exempts root from RLIMIT_NPROC; the pids cgroup caps root
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    layers = []
    if job.get("cgroup"):  # join the harness's pids cgroup: the process cap that also holds for root
        try:
            with open(os.path.join(job["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            layers.append(f"pids cgroup ({lim['nproc']} processes)")
        except OSError:
            layers.append("no pids cgroup (could not join)")
    out = os.open("result", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    readable = sorted(
        {
            sys.base_prefix,
            sys.base_exec_prefix,
            "/usr/lib",
            "/lib",
            "/lib64",
            "/usr/lib64",
            "/usr/share/zoneinfo",
            "/etc/localtime",
            "/dev/null",
            "/dev/urandom",
        }
    )
    layers.append(landlock(tmp, readable))
    with open("confinement", "w") as f:
        f.write("; ".join(layers))
    for name in list(sys.modules):  # a cached module would skip the import guard
        if name.split(".")[0] in BLOCKED_IMPORTS - {"signal", "_signal", "resource"}:
            del sys.modules[name]
    install_guard(tmp, readable)
    ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<program>", "exec"), ns)
        text = "ok\n" + repr(canon(eval(job["expr"], ns)))
    except BaseException as e:  # noqa: BLE001 - the program failed: the test fails
        text = f"error\n{type(e).__name__}"
    os.write(out, text.encode("utf-8", "replace"))
    # the value is in: threads or atexit handlers the program left (a sleeping thread) do not hold the test
    os._exit(0)


main()
