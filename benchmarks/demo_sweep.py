"""Benchmark 7: the whole README demo sweep (experiment=demo, then `ipsweep analyze`): wall time and peak
memory.

Run as `make demo` runs it, into a fresh sweep dir and a cold elicitation cache (the model cache is the
prepared one: `ipsweep prepare` ran before). Peak memory is the largest resident set of the processes
(Hydra's basic launcher runs the jobs inside the launching process).

  python benchmarks/demo_sweep.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import LAUNCH, device, peak_rss_gb, save, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "overrides",
        nargs="*",
        help="extra overrides for the sweep (e.g. model=tiny_random for a quick check)",
    )
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="ipsweep-bench-demo-")) / "demo"
    sweep_s, _ = timed(
        [
            *LAUNCH,
            "-m",
            "experiment=demo",
            f"hydra.sweep.dir={out}",
            f"elicit.cache_dir={out.parent / 'elicit'}",
            *a.overrides,
        ]
    )
    analyze_s, _ = timed([str(Path(sys.executable).parent / "ipsweep"), "analyze", str(out)])
    rows = [
        {"step": "python launch.py -m experiment=demo (8 jobs, 4 trainings)", "seconds": sweep_s},
        {"step": "ipsweep analyze", "seconds": analyze_s},
        {"step": "total", "seconds": sweep_s + analyze_s},
    ]
    save("demo_sweep", rows, peak_rss_gb=peak_rss_gb(children=True), overrides=a.overrides, on=device())


if __name__ == "__main__":
    main()
