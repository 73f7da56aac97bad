"""Benchmark 5: packing small jobs onto one GPU with the local_gpus launcher.

The same 8 SmolLM2-size jobs (trait_pair, 8 seeds), launched by `hydra/launcher=local_gpus`:
- one after another: one job at a time on GPU 0;
- packed: all 8 at once on GPU 0 (jobs_per_gpu=8), each its own process.
Target on a GPU: packed wall <= 0.35x. On a CPU-only machine the launcher runs cores // cpus_per_job jobs
at once, so the CPU arm compares 1 job with every core against one job per core: a different
question (labelled as such in the output), kept so the script runs anywhere.

  python benchmarks/gpu_packing.py          # GPU: 512 examples, 60 eval prompts per job; CPU: 32 and 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from common import LAUNCH, MODEL_HELP, device, model_overrides, save, timed


def sweep(name: str, launcher: list[str], a, work: Path) -> float:
    out = work / name
    seeds = ",".join(str(s) for s in range(a.jobs))
    wall, _ = timed(
        [
            *LAUNCH,
            "-m",
            "hydra/launcher=local_gpus",
            *launcher,
            *model_overrides(a.model),
            "setting=trait_pair",
            "prompt=caps_strong",
            f"train.seed={seeds}",
            "train.epochs=1",
            f"train.n_train={a.n_train}",
            f"eval.n_eval={a.n_eval}",
            "logger=none",
            f"store_dir={out}",
            f"hydra.sweep.dir={out}",
            f"elicit.cache_dir={out / 'elicit'}",
        ]
    )
    done = len(list(out.glob("runs/*/record.json")))
    assert done == a.jobs, f"{name}: {done} of {a.jobs} records"
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help=MODEL_HELP)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=None, help="per job (default: 512 on a GPU, 32 on CPU)")
    ap.add_argument("--n-eval", type=int, default=None, help="per job (default: 60 on a GPU, 8 on CPU)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ipsweep-bench-packing-"))
    gpu = torch.cuda.is_available()
    a.n_train = a.n_train or (512 if gpu else 32)
    a.n_eval = a.n_eval or (60 if gpu else 8)
    cores = os.cpu_count() or 1
    if gpu:
        arms = [
            ("one after another", ["hydra.launcher.gpus=[0]", "hydra.launcher.jobs_per_gpu=1"]),
            (
                f"packed, {a.jobs} per GPU",
                ["hydra.launcher.gpus=[0]", f"hydra.launcher.jobs_per_gpu={a.jobs}"],
            ),
        ]
    else:
        arms = [
            (f"one after another, {cores} threads", [f"hydra.launcher.cpus_per_job={cores}"]),
            (f"{cores} at once, 1 thread each (CPU)", ["hydra.launcher.cpus_per_job=1"]),
        ]
    rows = [
        {"arm": name, "jobs": a.jobs, "seconds": sweep(f"arm{i}", launcher, a, work)}
        for i, (name, launcher) in enumerate(arms)
    ]
    save(
        "gpu_packing",
        rows,
        ratio=rows[1]["seconds"] / rows[0]["seconds"],
        target="<= 0.35 on a GPU",
        model=a.model,
        n_train=a.n_train,
        n_eval=a.n_eval,
        on=device(),
    )


if __name__ == "__main__":
    main()
