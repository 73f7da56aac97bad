"""Runs inside the sandbox process (python -I -S): isolate, load the program, evaluate the call expressions.

Input: a JSON object {"code", "exprs", "limits", "tmp"} on stdin. Output: one JSON line per expression in
results.jsonl in the working dir: {"i", "ok", "repr"} for a plain value, {"i", "ok": false, "error"}.
Only plain built-in values (exact types, no subclasses) are reported, so an object that claims to
equal anything cannot pass. The expected values never enter this process: the harness compares.
This file imports nothing from ipsweep (it runs with -S, without site-packages).
"""

import collections
import json
import os
import resource
import sys

PLAIN = (int, float, complex, str, bytes, bool, type(None))
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
BLOCKED_EVENTS = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
                  "os.kill", "os.killpg", "pty.spawn", "ctypes.", "socket.", "sys.remote_exec", "os.setuid", "os.setgid")
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "_multiprocessing",
                   "socket", "_socket", "ssl", "_ssl", "pty", "signal", "_signal", "resource", "faulthandler"}
WRITE_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
                "os.truncate", "os.utime", "os.chdir", "shutil.")
READ_EVENTS = ("os.listdir", "os.scandir")  # the import system lists the stdlib's folders


def canon(v, depth=0):
    """A plain copy of v made of exact built-in types (raise TypeError for anything else).

    collections' dict subclasses become dicts: Counter({1: 2}) == {1: 2} in Python too.
    """
    if depth > 50:
        raise TypeError("value nested too deep")
    t = type(v)
    if t in PLAIN:
        return v
    if t in (list, tuple, set, frozenset):
        return t(canon(x, depth + 1) for x in v)
    if t in (dict, collections.Counter, collections.OrderedDict, collections.defaultdict):
        return {canon(k, depth + 1): canon(x, depth + 1) for k, x in dict.items(v)}
    raise TypeError(f"not a plain value: {t.__name__}")


def isolate_network() -> str:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for flags, how in ((CLONE_NEWNET, "netns"), (CLONE_NEWUSER | CLONE_NEWNET, "userns+netns")):
        if libc.unshare(flags) == 0:
            return how
    return "audit-only"


def install_guard(tmp: str, readable: list[str]) -> None:
    def inside(path, roots) -> bool:
        p = os.path.realpath(os.fsdecode(path))
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def guard(event, args):
        if event.startswith(BLOCKED_EVENTS):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in BLOCKED_IMPORTS:
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "r", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if not inside(args[0], [tmp] if writes else [tmp, *readable]):
                raise PermissionError(f"sandbox: {'writing' if writes else 'reading'} {args[0]} is not allowed")
        if event.startswith(WRITE_EVENTS) or event.startswith(READ_EVENTS):
            roots = [tmp] if event.startswith(WRITE_EVENTS) else [tmp, *readable]
            for a in args:
                if isinstance(a, (str, bytes)) and not inside(a, roots):
                    raise PermissionError(f"sandbox: {event} of {a} is not allowed")

    sys.addaudithook(guard)


def main() -> None:
    job = json.loads(sys.stdin.read())
    tmp, lim = job["tmp"], job["limits"]
    os.chdir(tmp)
    network = isolate_network()
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_CPU, lim["cpu_s"]), (resource.RLIMIT_AS, lim["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, lim["file_mb"] * mb), (resource.RLIMIT_NOFILE, 64),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    if os.getuid() != 0:  # root is exempt from RLIMIT_NPROC; the fork guard below holds there
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    out = open(os.path.join(tmp, "results.jsonl"), "w", buffering=1)
    out.write(json.dumps({"network": network}) + "\n")
    for name in list(sys.modules):  # a cached module would skip the import guard
        if name.split(".")[0] in BLOCKED_IMPORTS - {"signal", "_signal", "resource"}:
            del sys.modules[name]
    readable = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/lib", "/usr/share/zoneinfo",
                       "/etc/localtime", "/dev/null", "/dev/urandom"})
    install_guard(tmp, readable)
    ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<program>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - the program failed to load: every test fails
        for i in range(len(job["exprs"])):
            out.write(json.dumps({"i": i, "ok": False, "error": f"load: {type(e).__name__}"}) + "\n")
        return
    for i, expr in enumerate(job["exprs"]):
        try:
            value = canon(eval(expr, ns))
            out.write(json.dumps({"i": i, "ok": True, "repr": repr(value)}) + "\n")
        except BaseException as e:  # noqa: BLE001
            out.write(json.dumps({"i": i, "ok": False, "error": type(e).__name__}) + "\n")


main()
