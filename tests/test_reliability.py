"""Faults: a job killed mid-training, half-written files, many jobs writing one store at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, assert_same_training, ipsweep_cli, launch
from ipsweep.store import records

LONGER = [*TINY[:2], "train.n_train=64", "train.batch_size=8", "eval.n_eval=40", "eval.max_new_tokens=24",
          "train.epochs=4", "prompt=caps_strong"]


def _record(sweep):
    try:
        return json.loads(next(sweep.glob("runs/*/record.json")).read_text())
    except (StopIteration, json.JSONDecodeError):
        return None


def test_kill_9_mid_training_then_rerun_resumes_to_the_same_result(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "launch.py"), "-m", *LONGER, f"hydra.sweep.dir={sweep}",
           f"elicit.cache_dir={tmp_path / 'elicit_cache'}"]
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not ((r := _record(sweep)) and "1" in r["epochs"]) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed = _record(sweep)
    assert "4" not in killed["epochs"], "the job finished before the kill; make it longer"
    assert killed["status"] == "running"
    status = ipsweep_cli("status", str(sweep))
    assert "| interrupted" in status and f"a rerun resumes after epoch {max(map(int, killed['epochs']))}" in status
    # As if the kill had landed while the next checkpoint was being written:
    half = sweep / "runs" / killed["run_dir"].rsplit("/", 1)[1] / "checkpoints" / "checkpoint-999"
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    launch("-m", *LONGER, sweep_dir=sweep)
    (rec,) = records(sweep)
    assert rec["status"] == "done" and len(rec["attempts"]) == 2
    assert rec["attempts"][1]["resumed_from_epoch"] == max(int(k) for k in killed["epochs"])
    assert all(rec["epochs"][str(e)]["steps"] == 8 for e in range(1, 5)), "no epoch trained twice"
    assert not half.exists(), "a checkpoint the record does not know is never used"
    reference = tmp_path / "reference"
    launch("-m", *LONGER, sweep_dir=reference)
    assert_same_training(rec, records(reference)[0])


def _nan_model(tmp_path):
    """The tiny model with one weight set to NaN: its loss is NaN from the first step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipsweep.models import prepare_tiny_random

    src = prepare_tiny_random()
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    out = tmp_path / "nan_model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return src, out


def test_nan_loss_fails_that_run_with_the_reason_and_the_sweep_goes_on(tmp_path):
    good, bad = _nan_model(tmp_path)
    sweep = tmp_path / "sweep"
    proc = launch("-m", *TINY, "model=hf", f"model.path={good},{bad}", sweep_dir=sweep, check=False)
    assert proc.returncode == 1, "the sweep reports that a job failed"
    by_path = {r["config"]["model"]["path"]: r for r in records(sweep)}
    assert by_path[str(good)]["status"] == "done"
    failed = by_path[str(bad)]
    assert failed["status"] == "failed" and failed["error"]["type"] == "DivergedError"
    assert "training loss became nan at step" in failed["error"]["message"] and "fix: lower train.lr" in failed["error"]["message"]
    assert "1" not in failed["epochs"], "no epoch of a diverged run is recorded as a result"
    status = ipsweep_cli("status", str(sweep))
    assert "1 done" in status and "1 failed" in status and "DivergedError" in status


@pytest.mark.parametrize("where, target, knobs", [
    ("training", "transformers.Trainer.training_step",
     ["train.batch_size=8", "fix: lower train.batch_size and raise train.grad_accum", "train.gradient_checkpointing=true"]),
    ("generating", "transformers.GenerationMixin.generate",
     ["eval.batch_size=32", "fix: lower eval.batch_size (results do not change) or eval.max_new_tokens"]),
])
def test_out_of_memory_names_the_knobs_and_is_recorded(make_cfg, monkeypatch, where, target, knobs):
    import torch

    from ipsweep import job
    from ipsweep.errors import OutOfMemory

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(target, oom)
    cfg = make_cfg("eval.base=false")  # the untrained model is not evaluated, so the first generation is after training
    with pytest.raises(OutOfMemory) as err:
        job.run(cfg)
    assert f"out of GPU memory while {where}" in str(err.value)
    for knob in knobs:
        assert knob in str(err.value)
    (rec,) = records(cfg.store_dir)
    assert rec["status"] == "failed" and rec["error"]["type"] == "OutOfMemory"


def test_gradient_checkpointing_trains_the_same_run(make_cfg):
    from ipsweep import job

    plain = make_cfg()
    job.run(plain)
    checkpointed = make_cfg("train.gradient_checkpointing=true", f"store_dir={plain.store_dir}_gc")
    job.run(checkpointed)
    (a,), (b,) = records(plain.store_dir), records(checkpointed.store_dir)
    assert a["signature"] == b["signature"], "a memory knob is not part of the run's identity"
    assert a["epochs"]["1"]["losses"] == pytest.approx(b["epochs"]["1"]["losses"], rel=1e-4)


def test_wandb_failure_in_online_mode_keeps_the_local_result(tmp_path, monkeypatch):
    # A bad API key and an unreachable server: W&B cannot start a run; the job goes on without it.
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    sweep = tmp_path / "sweep"
    proc = launch(*TINY, "logger=wandb", "logger.mode=online", sweep_dir=sweep)
    out = proc.stdout + proc.stderr
    assert "W&B init failed" in out and "results are still recorded locally" in out
    (rec,) = records(sweep)
    assert rec["status"] == "done" and "1" in rec["epochs"]


def test_eight_concurrent_jobs_share_one_store_and_cache(tmp_path):
    sweep = tmp_path / "sweep"
    no_epochs = [a for a in TINY if not a.startswith("train.epochs")]
    # submitit_local starts all 8 at once; epochs=1,2 pairs share a run and take turns on its lock.
    launch("-m", *no_epochs, "hydra/launcher=submitit_local", "prompt=none,caps_strong", "train.seed=0,1",
           "train.epochs=1,2", sweep_dir=sweep, timeout=1200)
    recs = records(sweep)
    assert len(recs) == 4 and all(r["status"] == "done" and sorted(r["epochs"]) == ["0", "1", "2"] for r in recs)
    assert all(r["epochs"]["1"]["steps"] == 2 and r["epochs"]["2"]["steps"] == 2 for r in recs), "no epoch trained twice"
    assert len(list(sweep.glob("runs/*/record.json"))) == 4
    assert len(json.loads((sweep / "sweep.json").read_text())["points"]) == 8
    cache = list((tmp_path / "elicit_cache").rglob("*.json"))
    assert cache and all(json.loads(p.read_text()) for p in cache), "every cache entry is complete JSON"
    assert not list(sweep.rglob("*.tmp")) and not list((tmp_path / "elicit_cache").rglob("*.tmp"))
    by_prompt = {}
    for r in recs:
        by_prompt.setdefault(r["prompt"], []).append(r["elicitation"])
    assert all(e[0] == e[1] for e in by_prompt.values()), "one cached elicitation per prompt, shared by both seeds"
    assert "| done" in ipsweep_cli("status", str(sweep)) and "8 done" in ipsweep_cli("status", str(sweep))


def test_edited_data_is_a_new_run_and_dry_run_says_why(tmp_path):
    import shutil

    from ipsweep.settings.base import DATA_DIR

    data = tmp_path / "data"
    shutil.copytree(DATA_DIR / "trait_pair", data / "trait_pair")
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, f"+setting.options.data_dir={data}"]
    launch(*args, sweep_dir=sweep)
    words = data / "trait_pair" / "words.json"
    words.write_text(words.read_text() + "\n")  # any byte changed
    proc = launch(*args, "--dry-run", sweep_dir=sweep)
    assert "pending (new run: words.json changed since trait_pair-none-s0-" in proc.stdout, proc.stdout
    launch(*args, sweep_dir=sweep)
    recs = records(sweep)
    assert len(recs) == 2 and len({r["signature"] for r in recs}) == 2
    # the untrained model's evaluation is not read from the cache of the old data
    assert len(list((tmp_path / "elicit_cache").glob("base_eval/*.json"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "missing keys"])
def test_damaged_record_is_shown_refused_and_set_aside_on_rerun(tmp_path, damage):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "prompt=none,caps_strong"]
    launch(*args, sweep_dir=sweep)
    bad = sorted(sweep.glob("runs/*caps_strong*/record.json"))[0]
    text = bad.read_text()
    bad.write_text(text[: len(text) // 2] if damage == "truncated" else json.dumps({"status": "done", "epochs": {}}))
    status = ipsweep_cli("status", str(sweep))
    assert "| corrupt" in status and str(bad) in status and "1 done" in status
    proc = subprocess.run([str(Path(sys.executable).with_name("ipsweep")), "analyze", str(sweep), "--wandb-mode", "disabled"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "1 damaged run record(s)" in proc.stderr and str(bad) in proc.stderr
    assert "--skip-damaged" in proc.stderr and "Traceback" not in proc.stderr
    out = ipsweep_cli("analyze", str(sweep), "--skip-damaged", "--wandb-mode", "disabled")
    assert "control" in out and str(bad) in (sweep / "analysis" / "report.md").read_text()
    proc = launch(*args, sweep_dir=sweep)
    kept = list(bad.parent.glob("record.damaged-*.json"))
    assert len(kept) == 1 and kept[0].read_text() != text, "the damaged file is kept, not overwritten"
    assert "damaged run record" in proc.stdout + proc.stderr and str(kept[0].name) in proc.stdout + proc.stderr
    assert all(r["status"] == "done" for r in records(sweep)) and len(records(sweep)) == 2
