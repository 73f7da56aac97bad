"""The real embedded model, end to end: a 2-job multirun, its records, W&B offline runs, and skip on rerun."""

import pytest
from conftest import launch

from ipsweep.store import records

pytestmark = pytest.mark.slow


def test_real_model_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "model=smollm2_135m",
        "logger=wandb",
        "prompt=none,caps_strong",
        "elicit.logprob_items=16",  # the estimator's own tests use the full 64 pairs
        "train.epochs=1",
        "train.n_train=24",
        "eval.n_eval=10",
        "eval.max_new_tokens=12",
    ]
    launch(*args, sweep_dir=sweep)
    recs = {r["prompt"]: r for r in records(sweep)}
    assert set(recs) == {"none", "caps_strong"}
    for r in recs.values():
        assert r["status"] == "done" and r["model"] == "smollm2_135m"
        ep = r["epochs"]["1"]
        assert ep["steps"] == 3 and 0 < ep["loss"] < 10
        m = ep["evals"]["none"]["metrics"]
        assert m["caps"]["n"] == 10 and m["correct"]["n"] == 10
        wandb_dirs = list((sweep / "runs").glob(f"*{r['signature']}/wandb/offline-run-*"))
        assert len(wandb_dirs) == 1 and list(wandb_dirs[0].glob("*.wandb"))
    # The untrained model answers some questions right and (measured) never in caps.
    base = recs["none"]["epochs"]["0"]["evals"]["none"]["metrics"]
    assert base["correct"]["k"] > 0 and base["caps"]["k"] == 0
    proc = launch(*args, sweep_dir=sweep)
    assert (proc.stdout + proc.stderr).count("skip:") == 2
    assert len(list(sweep.glob("runs/*/wandb/offline-run-*"))) == 2, "a skipped job opens no W&B run"
