"""Run model-written Python in a confined process, one process per test, and compare with values the harness
holds.

Each test's call (`f(3)` of `assert f(3) == 9`) runs in a new process, `python -I -S
ipsweep/sandbox_driver.py`, in a throwaway folder, with a minimal environment (no secrets). Layers,
each enforced by the kernel, so that nothing the program does to its own interpreter lifts them:
- outer (this module, the strongest the machine allows, see `outer_layers`): new PID, network and
  mount namespaces (`unshare`; the program sees no process outside, the harness included, and
  everything it starts dies with it) and no capabilities or new privileges (`setpriv`);
- inner (the driver): a pids cgroup (a process cap that holds for root too, where the machine has a
  writable pids controller), resource limits and Landlock (reads only the Python install, writes only
  its folder, no execve; on ABI 6+ no signal reaches a process outside the sandbox).
An audit hook inside gives clear errors for forks, sockets and such; it is a convenience, not a layer.

Timing is load-independent: a test's budget is CPU seconds (`Limits.cpu_s`, measured by the kernel
for the process tree), so a busy machine does not turn a correct program into a failure. A program whose
process tree uses no CPU for `Limits.idle_s` seconds (it sleeps or blocks) is ended, and a wall-clock
backstop (`Limits.wall_s`, generous) ends what slips through. A test that runs out of any is a
`timeout`, its own outcome, never a failure. Once the driver has written the value it exits at once, so
a thread or an atexit handler the program left behind does not hold the test open.

The program reports only a plain value (`repr` of built-in and a few standard types); the harness
reads it from a capped plain file with a parser that rebuilds only data (`plain_value`), never code,
and compares it with the expected value, which never enters the program's process.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

DRIVER = Path(__file__).with_name("sandbox_driver.py")
log = logging.getLogger(__name__)
PASS, FAIL, TIMEOUT = "pass", "fail", "timeout"
NAMESPACES = ["--pid", "--fork", "--kill-child", "--mount-proc", "--net"]
NO_PRIVILEGES = ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 10.0  # per test, CPU seconds: decides a timeout, whatever the machine's load
    wall_s: float = 60.0  # per test, wall clock: a backstop for what the idle rule misses
    # per test: a process tree that uses no CPU for this long (it sleeps or blocks) is ended
    idle_s: float = 5.0
    memory_mb: int = 512
    file_mb: int = 1
    nproc: int = 32


@dataclass(frozen=True)
class Test:
    """One `assert <call> == <expected>` or `assert math.isclose(<call>, <expected>, ...)`."""

    call: str
    expected: str
    isclose: dict | None = None  # keyword arguments of math.isclose


def parse_test(line: str) -> Test:
    node = ast.parse(line.strip()).body[0]
    if not isinstance(node, ast.Assert):
        raise ValueError(f"not an assert: {line}")
    e = node.test
    if isinstance(e, ast.Compare) and len(e.ops) == 1 and isinstance(e.ops[0], ast.Eq):
        return Test(ast.unparse(e.left), ast.unparse(e.comparators[0]))
    if isinstance(e, ast.Call) and ast.unparse(e.func) == "math.isclose" and len(e.args) == 2:
        return Test(
            ast.unparse(e.args[0]),
            ast.unparse(e.args[1]),
            {k.arg: ast.literal_eval(k.value) for k in e.keywords},
        )
    raise ValueError(f"unsupported test form (use `assert call == expected` or math.isclose): {line}")


def _works(prefix: list[str]) -> bool:
    try:
        return (
            subprocess.run(
                [*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=30
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def outer_layers() -> tuple[tuple[str, ...], str]:
    """The command prefix for the strongest outer confinement this machine allows, and what it gives.

    As root, unshare makes the namespaces directly; otherwise inside a user namespace (where the
    kernel allows unprivileged ones). Without unshare, the inner layers (Landlock, limits) remain.
    """
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    for prefix, what in [
        (
            ["unshare", *user, *NAMESPACES, "--", *NO_PRIVILEGES],
            "PID, network and mount namespaces; no capabilities",
        ),
        (["setpriv", "--no-new-privs"], "no namespaces (unshare refused here); no new privileges"),
        ([], "no namespaces, no setpriv"),
    ]:
        if (not prefix or shutil.which(prefix[0])) and _works(prefix):
            return tuple(prefix), what
    raise RuntimeError(f"{sys.executable} -I -S does not start; the code sandbox cannot run")


PIDS_HIERARCHIES = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))  # cgroup v1 pids, v2 unified


def _pids_cgroup(limit: int) -> Path | None:
    """A fresh cgroup that caps the number of processes (pids.max), for a sandbox to join: the cap that
    holds for root too, whom the kernel exempts from RLIMIT_NPROC. None where the machine gives no
    writable pids controller (then RLIMIT_NPROC and the namespaces are what there is)."""
    for root in PIDS_HIERARCHIES:
        try:
            group = Path(tempfile.mkdtemp(prefix="ipsweep-sandbox-", dir=root))
        except OSError:
            continue
        try:
            (group / "pids.max").write_text(str(limit))
            return group
        except OSError:
            _remove_cgroup(group)
    return None


def _remove_cgroup(group: Path | None) -> None:
    """rmdir the cgroup once the kernel has reaped everything in it (killing a PID namespace takes a
    moment)."""
    for _ in range(50):
        try:
            group and group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    log.warning("sandbox cgroup %s is not empty; left in place", group)


def confinement() -> str:
    """What confines a program on this machine (outer and inner layers), for logs and run records."""
    out = run("", "0")
    return f"{outer_layers()[1]}; {out.get('confinement', 'inner layers unknown')}"


@functools.cache
def report_confinement() -> str:
    """Log, once per process, what confines programs here: a warning when a layer is missing (namespaces,
    Landlock, or, as root, whom the kernel exempts from RLIMIT_NPROC, the pids cgroup)."""
    what = confinement()
    uncapped = os.geteuid() == 0 and "pids cgroup (" not in what
    weak = what.startswith("no") or "namespaces" not in what or "landlock ABI" not in what or uncapped
    log.log(logging.WARNING if weak else logging.INFO, "code sandbox: %s", what)
    return what


def _tree_cpu_ticks(root: int) -> int | None:
    """CPU clock ticks used so far by `root` and every process below it (the children it reaped included),
    read from /proc; None where /proc cannot be read. A PID namespace hides nothing from here: inside
    processes keep their parent links in the harness's view."""
    parent, ticks = {}, {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
        pid = int(stat_file.parent.name)
        parent[pid] = int(fields[1])
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    if root not in ticks:
        return None
    tree, todo = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return sum(ticks[p] for p in tree)


def _wait(proc: subprocess.Popen, limits: Limits) -> tuple[float, bool]:
    """Wait for the process, killing its group at the wall-clock backstop or once its process tree has used no
    CPU for `limits.idle_s` (a program that sleeps, e.g. in a thread that keeps the interpreter alive); return
    (CPU seconds of the process tree, whether it was ended for time). wait4 reports the CPU of the process and
    of the children it waited for (the driver, inside unshare)."""
    start = time.monotonic()
    deadline, pause, ended = start + limits.wall_s, 0.001, False
    last_ticks, last_progress, next_look = None, start, start + 0.25
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.monotonic()
        if now >= next_look:  # idle rule: CPU progress of the whole tree, looked at four times a second
            next_look = now + 0.25
            ticks = _tree_cpu_ticks(proc.pid)
            if ticks is not None and ticks != last_ticks:
                last_ticks, last_progress = ticks, now
        if now > deadline or now - last_progress > limits.idle_s:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            ended = True
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything the program left in its group
    except ProcessLookupError:
        pass
    return usage.ru_utime + usage.ru_stime, ended


def _read_capped(path: Path, cap: int) -> bytes:
    """At most `cap` bytes of a plain file the program may have tampered with (never a fifo, device or
    link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return os.read(fd, cap) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    finally:
        os.close(fd)


def run(code: str, expr: str, limits: Limits = Limits()) -> dict:
    """Load `code` and evaluate `expr` in a sandbox process. Returns {"ok": True, "repr"} or
    {"ok": False, "error", "timeout"}, plus "confinement" (what the inner layers applied)."""
    tmp, group = tempfile.mkdtemp(prefix="ipsweep-sandbox-"), _pids_cgroup(limits.nproc)
    try:
        job = Path(tmp) / "job.json"
        job.write_text(
            json.dumps(
                {
                    "code": code,
                    "expr": expr,
                    "tmp": tmp,
                    "cgroup": str(group) if group else None,
                    "limits": {**limits.__dict__, "cpu_s": math.ceil(limits.cpu_s)},
                }
            )
        )
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(
            [*outer_layers()[0], sys.executable, "-I", "-S", str(DRIVER), str(job)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp,
            env=env,
            start_new_session=True,
        )
        cpu_s, wall_out = _wait(proc, limits)
        status, _, body = (
            _read_capped(Path(tmp) / "result", limits.file_mb << 20)
            .decode("utf-8", "replace")
            .partition("\n")
        )
        if status == "ok":
            out = {"ok": True, "repr": body}
        elif wall_out or cpu_s >= math.ceil(limits.cpu_s) - 0.05:
            out = {"ok": False, "error": "timeout", "timeout": True}
        else:
            error = body[:200] if status == "error" else "no result (the program exited or was killed)"
            out = {"ok": False, "error": error, "timeout": False}
        return {
            **out,
            "confinement": _read_capped(Path(tmp) / "confinement", 1000).decode("utf-8", "replace"),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_cgroup(group)


CALLS = {
    "Fraction": Fraction,
    "Decimal": Decimal,
    "deque": deque,
    "range": range,
    "bytearray": bytearray,
    "set": set,
    "frozenset": frozenset,
}
LITERALS = (int, float, complex, str, bytes, bool, type(None))


def _build(node: ast.AST):
    """Rebuild plain data from the parsed repr; only literals, containers and the CALLS types."""
    if isinstance(node, ast.Constant) and type(node.value) in LITERALS:
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_build(e) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_build(k): _build(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
        return float(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _build(node.operand)
        if type(v) in (int, float, complex):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):  # complex: 1+2j
        a, b = _build(node.left), _build(node.right)
        if type(a) in (int, float) and type(b) is complex:
            return a + b if isinstance(node.op, ast.Add) else a - b
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CALLS:
        kwargs = {
            k.arg: _build(k.value) for k in node.keywords if node.func.id == "deque" and k.arg == "maxlen"
        }
        if len(kwargs) == len(node.keywords):
            return CALLS[node.func.id](*[_build(a) for a in node.args], **kwargs)
    raise ValueError(f"not plain data: {ast.unparse(node)[:80]}")


def plain_value(text: str):
    """The value a sandbox reported, rebuilt as data. Raises ValueError for anything else, including
    text the program made too deep or too large to parse (it controls these bytes)."""
    try:
        return _build(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, RecursionError, MemoryError, TypeError, OverflowError, ArithmeticError) as e:
        raise ValueError(f"unreadable value: {type(e).__name__}") from None


def expected_values(tests: list[Test], limits: Limits = Limits()) -> list:
    """The tests' expected values: literals read directly, other expressions evaluated in a sandbox of
    their own, with the standard-library modules they name imported (`sys.getsizeof(...)`)."""
    out = []
    for t in tests:
        try:
            out.append(ast.literal_eval(t.expected))
            continue
        except (ValueError, SyntaxError):
            pass
        names = {n.id for n in ast.walk(ast.parse(t.expected, mode="eval")) if isinstance(n, ast.Name)}
        prelude = "".join(f"import {m}\n" for m in sorted(names & sys.stdlib_module_names))
        o = run(prelude, t.expected, limits)
        if not o["ok"]:
            raise ValueError(f"expected value `{t.expected}` could not be computed: {o['error']}")
        out.append(plain_value(o["repr"]))
    return out


def outcome(test: Test, want, result: dict) -> str:
    """pass, fail or timeout for one test's sandbox result."""
    if result.get("timeout"):
        return TIMEOUT
    try:
        got = plain_value(result["repr"]) if result["ok"] else None
        ok = result["ok"] and (
            math.isclose(got, want, **test.isclose) if test.isclose is not None else got == want
        )
    except (ValueError, TypeError, ArithmeticError) as e:
        log.info("sandbox: %s failed: %s", test.call[:80], e)  # a value the harness cannot read or compare
        ok = False
    return PASS if ok else FAIL


def check(code: str, tests: list[Test], expected: list, limits: Limits = Limits()) -> list[str]:
    """The outcome of each test for `code`: pass, fail or timeout (one sandbox process per test)."""
    return [outcome(t, want, run(code, t.call, limits)) for t, want in zip(tests, expected)]


def check_many(
    jobs: list[tuple[str, list[Test], list]], limits: Limits = Limits(), workers: int | None = None
) -> list[list[str]]:
    """check() for many programs at once, at most `workers` running at a time (default: the CPUs this process
    may run on, which SLURM and local_gpus restrict)."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=workers or len(os.sched_getaffinity(0)) or 1) as pool:
        return list(pool.map(lambda j: check(*j, limits), jobs))
