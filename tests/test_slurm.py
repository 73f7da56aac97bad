"""Sweeps on a real single-node SLURM cluster (started by scripts/slurm_test_cluster.sh; needs root).

The cluster has no GPUs, so these jobs are CPU-only; the GPU request of the preset is checked in the
rendered sbatch script (test_launchers.py).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, assert_same_training, ipsweep_cli, launch

from ipsweep.store import records

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one cluster: one worker
SCRIPT = ROOT / "scripts" / "slurm_test_cluster.sh"
CPU_JOBS = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=4",
]


@pytest.fixture(scope="module")
def slurm():
    env = {**os.environ, "IPSWEEP_SLURM_DIR": os.environ.get("IPSWEEP_SLURM_DIR", "/tmp/ipsweep-slurm")}
    ctld_pid = Path(env["IPSWEEP_SLURM_DIR"]) / "run" / "slurmctld.pid"
    was_running = ctld_pid.is_file()
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True)
    assert started.returncode == 0, f"could not start the test SLURM cluster:\n{started.stderr[-3000:]}"
    conf = started.stdout.strip()
    os.environ["SLURM_CONF"] = conf
    yield conf
    if not was_running:  # leave a cluster someone else started alone
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, check=True)


def _sacct(job: str) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job], capture_output=True, text=True
    ).stdout
    return dict(line.split("|") for line in out.split())


def _wait(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if value := cond():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_four_point_sweep_records_skip_and_status(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, *CPU_JOBS, "prompt=none,caps_strong", "train.seed=0,1"]
    launch(*args, sweep_dir=sweep)
    recs = records(sweep)
    assert len(recs) == 4 and all(r["status"] == "done" for r in recs)
    array = {r["attempts"][0]["job_id"].split("_")[0] for r in recs}
    assert len(array) == 1, "one SLURM array for the sweep"
    (array_id,) = array
    _wait(lambda: set(_sacct(array_id).values()) == {"COMPLETED"}, 30, "sacct to report the array COMPLETED")
    assert all(Path(r["attempts"][0]["log"]).is_file() for r in recs)

    before = {p: p.stat().st_mtime_ns for p in sweep.glob("runs/*/record.json")}
    launch(*args, sweep_dir=sweep)
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("runs/*/record.json")} == before, (
        "a rerun recomputes nothing"
    )
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert logs.count("skip:") == 4

    status = ipsweep_cli("status", str(sweep))
    assert "4 done" in status


def test_preempted_job_is_requeued_and_resumes_to_the_same_result(slurm, tmp_path):
    point = [
        *TINY[:1],
        "logger=none",
        "train.n_train=64",
        "train.batch_size=8",
        "eval.n_eval=40",
        "eval.max_new_tokens=24",
        "train.epochs=4",
        "prompt=caps_strong",
    ]
    sweep = tmp_path / "slurm_sweep"
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        "-m",
        *point,
        *CPU_JOBS,
        f"hydra.sweep.dir={sweep}",
        f"elicit.cache_dir={tmp_path / 'elicit_cache'}",
    ]
    sweeping = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def record() -> dict:
        return json.loads(next(sweep.glob("runs/*/record.json")).read_text())

    def after_epoch_1():
        try:
            r = record()
        except (StopIteration, json.JSONDecodeError):
            return None
        return r if "1" in r["epochs"] else None

    job = _wait(after_epoch_1, 300, "epoch 1")["attempts"][0]["job_id"]
    assert "4" not in record()["epochs"], "the job finished before it could be preempted; make it longer"
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before a time limit
    _wait(
        lambda: subprocess.run(
            ["squeue", "-h", "-t", "PD", "-j", job], capture_output=True, text=True
        ).stdout.strip(),
        60,
        "the job to be requeued",
    )
    status = ipsweep_cli("status", str(sweep))
    assert "requeued" in status, status
    # skip SLURM's requeue hold
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    out, _ = sweeping.communicate(timeout=600)
    assert sweeping.returncode == 0, out[-3000:]

    rec = record()
    assert rec["status"] == "done" and len(rec["attempts"]) == 2
    assert rec["attempts"][1]["resumed_from_epoch"] >= 1 and rec["attempts"][1]["job_id"] == job
    assert all(rec["epochs"][str(e)]["steps"] == 8 for e in range(1, 5)), "no epoch trained twice"

    reference = tmp_path / "reference"
    launch(*point, sweep_dir=reference)
    (ref,) = records(reference)
    assert len(ref["attempts"]) == 1
    assert_same_training(rec, ref)
