"""Run model-written Python in a separate, limited process and check it against tests the harness holds.

Each program runs in its own process (python -I -S, ipsweep/sandbox_driver.py) in a new session and a
throwaway working dir, with a minimal environment (no secrets), wall-clock, CPU-time, memory,
file-size and open-file limits, its own network namespace where the kernel allows it, and an audit
hook that refuses forks, subprocesses, signals, sockets, ctypes, and file access outside its dir
(reads only from the Python install). On timeout the whole process group is killed.

A test such as `assert f(3) == 9` is split: the program's process evaluates only `f(3)` and reports it
as a plain value (exact built-in types; an object with a rigged __eq__ is refused); the expected value
(`9`) is read by the harness and never enters that process. So exiting early, printing "passed",
patching builtins or the driver cannot make a test pass: only the right value can.

The audit hook is a Python-level layer: good against what a fine-tuned model writes by accident or
by reward hacking, not a boundary against a deliberate native-code exploit. Run untrusted code from an
unknown source on a throwaway machine.
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DRIVER = Path(__file__).with_name("sandbox_driver.py")


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
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
        return Test(ast.unparse(e.args[0]), ast.unparse(e.args[1]),
                    {k.arg: ast.literal_eval(k.value) for k in e.keywords})
    raise ValueError(f"unsupported test form (use `assert call == expected` or math.isclose): {line}")


def run(code: str, exprs: list[str], limits: Limits = Limits()) -> list[dict]:
    """Evaluate `exprs` after loading `code`, in a sandbox process; one outcome per expression."""
    tmp = tempfile.mkdtemp(prefix="ipsweep-sandbox-")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0"}
    job = {"code": code, "exprs": exprs, "tmp": tmp, "limits": limits.__dict__}
    try:
        with open(Path(tmp) / "stdout.txt", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(DRIVER)], stdin=subprocess.PIPE, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
            try:
                proc.communicate(json.dumps(job).encode(), timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
                except ProcessLookupError:
                    pass
                proc.wait()
        outcomes: dict[int, dict] = {}
        results = Path(tmp) / "results.jsonl"
        for line in results.read_text(errors="replace").splitlines() if results.is_file() else []:
            try:
                row = json.loads(line)
                i = row["i"]
            except (ValueError, KeyError, TypeError):
                continue  # the header line, or something the program wrote
            if isinstance(i, int) and 0 <= i < len(exprs):
                outcomes.setdefault(i, row)  # the first report of a test counts
        return [outcomes.get(i, {"i": i, "ok": False, "error": "no result (killed, timed out or exited)"})
                for i in range(len(exprs))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _value(outcome: dict):
    if not outcome.get("ok") or not isinstance(outcome.get("repr"), str):
        raise ValueError(outcome.get("error", "no value"))
    return ast.literal_eval(outcome["repr"])  # plain data only; never code


def expected_values(tests: list[Test], limits: Limits = Limits()) -> list:
    """The tests' expected values: literals read directly, other expressions evaluated in a sandbox of their own."""
    out, pending = [], []
    for i, t in enumerate(tests):
        try:
            out.append(ast.literal_eval(t.expected))
        except (ValueError, SyntaxError):
            out.append(None)
            pending.append(i)
    if pending:
        for i, o in zip(pending, run("import math", [tests[i].expected for i in pending], limits)):
            out[i] = _value(o)
    return out


def check(code: str, tests: list[Test], expected: list, limits: Limits = Limits()) -> list[bool]:
    """Whether `code` passes each test."""
    passed = []
    for t, want, o in zip(tests, expected, run(code, [t.call for t in tests], limits)):
        try:
            got = _value(o)
            ok = math.isclose(got, want, **t.isclose) if t.isclose is not None else got == want
        except (ValueError, SyntaxError, TypeError):
            ok = False
        passed.append(bool(ok))
    return passed


def check_many(jobs: list[tuple[str, list[Test], list]], limits: Limits = Limits(), workers: int | None = None) -> list[list[bool]]:
    """check() for many programs at once, at most `workers` (default: CPU cores) running at a time."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda j: check(*j, limits), jobs))
