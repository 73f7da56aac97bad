"""Faults: a job killed mid-training, half-written files, many jobs writing one store at once."""

import json
import os
import signal
import subprocess
import sys
import time

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
