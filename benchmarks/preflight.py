"""Benchmark 10: sweeps of thousands of points: the pre-flight, and reading where a sweep stands.

- `--dry-run` of experiment=elicitation_correlation at 28, 448 and 2,016 points (`train.seed=range(0,S)`,
  28 points per seed), as shipped (a point's plain values applied to a copy of one composition) and, at 28
  and 448 points, with every point composed by Hydra from scratch (what the pre-flight did before), in the
  same run; median of --repeats runs each.
- a finished sweep of N points (one real tiny run's record and manifest entry copied N times):
  `ipsweep status` at 448 and 2,016 points, and the sweeper's bookkeeping after every job of the sweep
  (in-process): as shipped (each record read once) and, at 448 points, re-reading every finished record
  after each job (before).

  python benchmarks/preflight.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import LAUNCH, ROOT, save, timed

sys.path.insert(0, str(ROOT))
# The pre-flight as it was: every point composed by Hydra. Hydra re-executes plugin modules as it scans them,
# so the composer is replaced once the sweeper exists.
HYDRA_EACH = """
import runpy, sys
from hydra.core.plugins import Plugins
make = Plugins.instantiate_sweeper
def instantiate_sweeper(self, **kw):
    sweeper = make(self, **kw)
    composer = sys.modules["hydra_plugins.ipsweep_plugins.compose"].Composer
    composer.__call__ = composer.hydra
    return sweeper
Plugins.instantiate_sweeper = instantiate_sweeper
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""
TINY = ["model=tiny_random", "logger=none", "train.n_train=16", "eval.n_eval=4", "eval.max_new_tokens=2"]


def dry_run(seeds: int, hydra_each: bool, out: Path) -> float:
    args = [
        "-m",
        "experiment=elicitation_correlation",
        f"train.seed=range(0,{seeds})",
        f"hydra.sweep.dir={out}",
        "--dry-run",
    ]
    cmd = [sys.executable, "-c", HYDRA_EACH, *args] if hydra_each else [*LAUNCH, *args]
    seconds, stdout = timed(cmd)
    assert f"dry run: {28 * seeds} jobs" in stdout, stdout[:300]
    return seconds


def finished_sweep(n: int, one: Path, dest: Path) -> list[dict]:
    """A sweep dir of n finished points, each a copy of the one real run in `one`."""
    (point,) = json.loads((one / "sweep.json").read_text())["points"]
    run = Path(point["run_dir"])
    record = json.loads((run / "record.json").read_text())
    points = []
    for i in range(n):
        here = dest / "runs" / f"{run.name}-{i}"
        here.mkdir(parents=True)
        (here / "record.json").write_text(json.dumps({**record, "run_dir": str(here)}))
        points.append({**point, "num": i, "run_dir": str(here)})
    (dest / "sweep.json").write_text(json.dumps({"points": points}))
    return points


def bookkeeping(points: list[dict], reread: bool) -> float:
    """The sweeper's state keeping after each of the sweep's jobs, as shipped or re-reading every record."""
    from hydra_plugins.ipsweep_plugins.sweeper import IpsweepSweeper
    from ipsweep import status

    sweeper, start = IpsweepSweeper(None), time.perf_counter()
    for i in range(1, len(points) + 1):
        if reread:
            [status.point_state(p) for p in points[:i]]
        else:
            sweeper._progress(points[:i], set(), len(points), 1.0)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seeds in (1, 16, 72):
            for hydra_each in (False, True) if seeds <= 16 else (False,):
                times = [dry_run(seeds, hydra_each, tmp / "dry") for _ in range(args.repeats)]
                rows.append(
                    {
                        "what": "--dry-run",
                        "points": 28 * seeds,
                        "how": "every point composed by Hydra" if hydra_each else "shipped (copies)",
                        "seconds": round(statistics.median(times), 2),
                    }
                )
        timed([sys.executable, "-m", "ipsweep.cli", "prepare", "--tiny"])
        timed([*LAUNCH, "-m", *TINY, f"hydra.sweep.dir={tmp / 'one'}"])
        for n in (448, 2016):
            dest = tmp / f"sweep{n}"
            points = finished_sweep(n, tmp / "one", dest)
            seconds, out = timed([sys.executable, "-m", "ipsweep.cli", "status", str(dest)])
            assert f"{n} done" in out, out[-500:]
            rows.append(
                {"what": "ipsweep status", "points": n, "how": "shipped", "seconds": round(seconds, 2)}
            )
            for reread in (False, True) if n <= 448 else (False,):
                rows.append(
                    {
                        "what": "progress after every job",
                        "points": n,
                        "how": "every record re-read after each job"
                        if reread
                        else "shipped (each read once)",
                        "seconds": round(bookkeeping(points, reread), 2),
                    }
                )
            shutil.rmtree(dest)
    by = {(r["what"], r["points"], r["how"]): r["seconds"] for r in rows}
    ratios = {
        f"dry-run {n} / 28 points, shipped": round(
            by[("--dry-run", n, "shipped (copies)")] / by[("--dry-run", 28, "shipped (copies)")], 2
        )
        for n in (448, 2016)
    }
    ratios["dry-run 448 / 28 points, every point composed by Hydra"] = round(
        by[("--dry-run", 448, "every point composed by Hydra")]
        / by[("--dry-run", 28, "every point composed by Hydra")],
        2,
    )
    save("preflight", rows, repeats=args.repeats, ratios=ratios)
    for k, v in ratios.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
