"""Benchmark 4: the epochs axis. A sweep over train.epochs=1,2,3 vs the single 3-epoch run.

Naively the sweep trains 1+2+3 = 6 epochs, 2x the 3-epoch run. In ipsweep the three jobs share one
signature: each evaluates after every epoch and extends the previous job's checkpoint, so the sweep
trains 3 epochs in total; the rest is the fixed cost of the two extra jobs. Both arms run launch.py
as a user would (W&B offline, the default logger), each in a fresh sweep dir and elicitation cache.

  python benchmarks/epochs_axis.py                     # CPU: SmolLM2, trait_pair, 64 examples, 16 eval
  prompts python benchmarks/epochs_axis.py --n-train 512 --n-eval 60 # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import LAUNCH, MODEL_HELP, device, model_overrides, save, timed


def sweep(epochs: str, args, workdir: Path) -> tuple[float, list[dict]]:
    out = workdir / f"epochs-{epochs.replace(',', '_')}"
    wall, _ = timed(
        [
            *LAUNCH,
            "-m",
            *model_overrides(args.model),
            "setting=trait_pair",
            "prompt=caps_strong",
            f"train.epochs={epochs}",
            f"train.n_train={args.n_train}",
            f"eval.n_eval={args.n_eval}",
            f"store_dir={out}",
            f"hydra.sweep.dir={out}",
            f"elicit.cache_dir={out / 'elicit'}",
        ]
    )
    records = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/record.json"))]
    return wall, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help=MODEL_HELP)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=16)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ipsweep-bench-epochs-"))
    single_s, single = sweep("3", a, work)
    axis_s, axis = sweep("1,2,3", a, work)
    assert len(single) == len(axis) == 1, "one run each: the sweep's three jobs share one record"
    same = all(single[0]["epochs"][e]["loss"] == axis[0]["epochs"][e]["loss"] for e in ("1", "2", "3"))
    epoch_s = (
        sum(single[0]["epochs"][e]["train_s"] + single[0]["epochs"][e]["eval_s"] for e in ("1", "2", "3")) / 3
    )
    rows = [
        {"arm": "single run, train.epochs=3", "jobs": 1, "epochs_trained": 3, "seconds": single_s},
        {
            "arm": "sweep, train.epochs=1,2,3",
            "jobs": 3,
            "epochs_trained": len(axis[0]["epochs"]) - 1,
            "seconds": axis_s,
        },
        {
            "arm": "naive sweep (estimate: 6 epochs of the single run)",
            "jobs": 3,
            "epochs_trained": 6,
            "seconds": single_s * 2,
        },
    ]
    save(
        "epochs_axis",
        rows,
        ratio=axis_s / single_s,
        target="<= 1.15",
        same_losses_as_single_run=same,
        seconds_per_epoch_train_and_eval=epoch_s,
        attempts_in_sweep=len(axis[0]["attempts"]),
        model=a.model,
        n_train=a.n_train,
        n_eval=a.n_eval,
        on=device(),
    )


if __name__ == "__main__":
    main()
