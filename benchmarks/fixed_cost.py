"""Benchmark 6: the fixed cost of one job: what it pays before and around its training and evaluation.

Two measurements:
- parts, timed in a fresh interpreter: imports (torch, transformers, peft, ipsweep), model load from the
  prepared cache, W&B init + finish (offline), setting data load + tokenisation;
- a whole minimal job through launch.py (1 optimizer step, 1 eval prompt, 1 new token, W&B offline),
  minus the training and evaluation time its record holds: process start, Hydra, pre-flight, model
  load, record writes, W&B, checkpoint bookkeeping.

  python benchmarks/fixed_cost.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import LAUNCH, MODEL_HELP, device, model_overrides, save, timed

PARTS = r"""
import json, sys, time
t = time.perf_counter()
import torch, transformers, peft, wandb
import ipsweep.job, ipsweep.train, ipsweep.evaluate
out = {"imports": time.perf_counter() - t}
sys.path.insert(0, "benchmarks")
from common import compose
from ipsweep import models, prompts
from ipsweep.settings.base import build
from ipsweep.tracking import Tracker
from ipsweep.train import dataset
cfg = compose(*MODEL, "setting=trait_pair", "logger=wandb", "store_dir=STORE")
t = time.perf_counter(); model, tok = models.load(cfg.model); out["model_load"] = time.perf_counter() - t
t = time.perf_counter()
setting = build(cfg.setting)
rows, _ = dataset(tok, setting.train_examples(), cfg.train.max_length)
setting.eval_examples()
out["data_load"] = time.perf_counter() - t
t = time.perf_counter()
tr = Tracker(cfg, signature="bench", prompt=prompts.NO_PROMPT, run_dir="STORE", epochs=1); tr.finish()
out["wandb_init_finish"] = time.perf_counter() - t
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help=MODEL_HELP)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ipsweep-bench-fixed-"))

    code = PARTS.replace("MODEL", repr(model_overrides(a.model))).replace("STORE", str(work / "parts"))
    total, stdout = timed([sys.executable, "-c", code])
    parts = json.loads(stdout.strip().splitlines()[-1])
    parts["interpreter_total"] = total

    out = work / "job"
    job_s, _ = timed(
        [
            *LAUNCH,
            *model_overrides(a.model),
            "setting=trait_pair",
            "prompt=caps_strong",
            "train.n_train=8",
            "train.batch_size=8",
            "train.epochs=1",
            "eval.n_eval=1",
            "eval.max_new_tokens=1",
            "eval.base=false",
            "elicit.estimators=[]",
            f"store_dir={out}",
            f"hydra.run.dir={out}",
        ]
    )
    record = json.loads(next(out.glob("runs/*/record.json")).read_text())
    epoch = record["epochs"]["1"]
    fixed = job_s - epoch["train_s"] - epoch["eval_s"]
    rows = [{"part": k, "seconds": v} for k, v in parts.items()]
    rows += [
        {"part": "minimal job, wall", "seconds": job_s},
        {"part": "  of which training (1 step + checkpoint)", "seconds": epoch["train_s"]},
        {"part": "  of which evaluation (1 prompt)", "seconds": epoch["eval_s"]},
        {"part": "fixed cost per job (wall - training - evaluation)", "seconds": fixed},
    ]
    save(
        "fixed_cost",
        rows,
        fixed_cost_s=fixed,
        model_load_s=parts["model_load"],
        model_load_in_job_s=record["timings"]["model_load_s"],
        target="fixed <= 10 s, model load <= 1 s",
        model=a.model,
        on=device(),
    )


if __name__ == "__main__":
    main()
