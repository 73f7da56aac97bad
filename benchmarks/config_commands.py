"""Benchmark 8: how fast the config-only commands answer (`--help`, `--cfg job`, shell completion,
`--dry-run`).

launch.py imports torch/transformers/peft only when a job runs. Each command is timed both ways in the same
run:
`lazy` is launch.py as shipped; `eager` runs the same launch.py after importing ipsweep.job first (what every
command paid before). Median of --repeats runs each.

  python benchmarks/config_commands.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, save

EAGER = (
    "import runpy, sys, ipsweep.job; sys.argv = ['launch.py', *sys.argv[1:]]; "
    "runpy.run_path('launch.py', run_name='__main__')"
)
COMMANDS = {
    "--help": ["--help"],
    "--cfg job": ["--cfg", "job"],
    "TAB completion": ["-sc", "query=bash"],
    "--dry-run (1 point)": ["model=tiny_random", "--dry-run", "hydra.sweep.dir=/tmp/ipsweep-bench-dry"],
}


def run(argv: list[str], eager: bool) -> float:
    cmd = [sys.executable, "-c", EAGER, *argv] if eager else [sys.executable, "launch.py", *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COMP_LINE": "python launch.py train.l", "COMP_POINT": "24"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:5])} ... failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = []
    for name, argv in COMMANDS.items():
        lazy = statistics.median(run(argv, eager=False) for _ in range(args.repeats))
        eager = statistics.median(run(argv, eager=True) for _ in range(args.repeats))
        rows.append(
            {
                "command": name,
                "lazy_s": round(lazy, 2),
                "eager_s": round(eager, 2),
                "speedup": round(eager / lazy, 1),
            }
        )
    save("config_commands", rows, repeats=args.repeats)


if __name__ == "__main__":
    main()
