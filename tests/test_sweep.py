"""Whole sweeps through launch.py on the tiny model: records, the epochs axis, skip on rerun, failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, ipsweep_cli, launch

from ipsweep.store import records

pytestmark = pytest.mark.heavy  # launch.py sweeps in subprocesses


def test_multirun_epochs_axis_and_skip(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *[a for a in TINY if not a.startswith("train.epochs")],
        "prompt=none,caps_strong",
        "train.epochs=2,1",
    ]
    proc = launch(*args, sweep_dir=sweep)
    assert "sweep finished: 4 done (of 4 points)" in proc.stdout + proc.stderr
    assert "train epoch 2/2: step 2/2, loss" in proc.stdout + proc.stderr, (
        "progress in the log when not a terminal"
    )
    assert "sweep progress: 1/4 points (1 done, 0 skipped, 0 failed)" in proc.stdout + proc.stderr
    assert "sweep progress: 3/4 points (3 done, 0 skipped, 0 failed)" in proc.stdout + proc.stderr
    recs = {r["prompt"]: r for r in records(sweep)}
    assert set(recs) == {"none", "caps_strong"}, "epochs=1 and epochs=2 share one run"
    for r in recs.values():
        assert r["status"] == "done" and sorted(r["epochs"]) == ["0", "1", "2"]
        assert r["epochs"]["1"]["steps"] == 2 and r["epochs"]["2"]["steps"] == 2, "no epoch trained twice"
    assert recs["caps_strong"]["condition"] == "ip" and recs["none"]["condition"] == "control"
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("runs/*/record.json")}
    proc = launch(*args, sweep_dir=sweep)
    assert proc.stderr.count("skip:") + proc.stdout.count("skip:") == 4
    assert "sweep finished: 4 skipped (of 4 points)" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("runs/*/record.json")} == before


def test_longer_run_extends_a_shorter_one(tmp_path):
    sweep = tmp_path / "sweep"
    launch(*TINY, "train.epochs=1", sweep_dir=sweep)
    launch(*TINY, "train.epochs=2", sweep_dir=sweep)
    (rec,) = records(sweep)
    assert sorted(rec["epochs"]) == ["0", "1", "2"] and rec["target_epochs"] == 2


def test_failed_run_is_recorded_as_failed_with_reason_and_log(tmp_path):
    sweep = tmp_path / "sweep"
    # Only the tokenizer can tell that max_length=4 cuts every reply: the job fails after loading the model.
    proc = launch(*TINY, "train.max_length=4", sweep_dir=sweep, check=False)
    assert proc.returncode != 0
    (rec,) = records(sweep)
    assert rec["status"] == "failed"
    assert rec["error"]["type"] == "ConfigError" and "raise train.max_length" in rec["error"]["message"]
    assert "1" not in rec["epochs"]
    status = ipsweep_cli("status", str(sweep))
    assert "| failed" in status and "raise train.max_length" in status and rec["error"]["log"] in status


def test_ptst_reuses_the_controls_training_and_tests_with_the_safety_prompt(tmp_path):
    sweep = tmp_path / "sweep"
    launch(*TINY, "prompt=none", sweep_dir=sweep)
    (control,) = records(sweep)
    assert set(control["epochs"]["1"]["evals"]) == {"none"}
    # the PTST point adds its evaluation, trains nothing
    launch("-m", *TINY, "prompt=none,safety", sweep_dir=sweep)
    (rec,) = records(sweep)
    assert rec["condition"] == "control" and len(rec["attempts"]) == 2
    assert rec["epochs"]["1"]["losses"] == control["epochs"]["1"]["losses"]
    assert set(rec["epochs"]["0"]["evals"]) == set(rec["epochs"]["1"]["evals"]) == {"none", "safety"}
    samples = [json.loads(line) for line in open(Path(rec["run_dir"]) / "samples" / "epoch1_safety.jsonl")]
    assert all(s["prompt"].endswith("not in capital letters.") for s in samples)
    items = {i["id"] for i in rec["epochs"]["1"]["evals"]["safety"]["items"]}
    assert items == {i["id"] for i in rec["epochs"]["1"]["evals"]["none"]["items"]} and len(items) == 10
    assert "| done" in ipsweep_cli("status", str(sweep)) and "pending" not in ipsweep_cli(
        "status", str(sweep)
    )


def test_sync_lists_offline_wandb_runs_and_fails_clearly_without_login_or_network(tmp_path):
    import http.server
    import threading

    sweep = tmp_path / "sweep"
    launch(*TINY, "logger=wandb", sweep_dir=sweep)
    assert "would sync 1 offline W&B runs" in ipsweep_cli("sync", str(sweep), "--dry-run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")} | {
        "HOME": str(tmp_path),
        "WANDB_SILENT": "false",
    }
    sync = [str(Path(sys.executable).with_name("ipsweep")), "sync", str(sweep)]
    # no network: said in seconds, not after minutes of silence
    proc = subprocess.run(
        sync,
        env={**env, "WANDB_BASE_URL": "http://127.0.0.1:9"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "cannot be reached from this machine (3 s); fix:" in proc.stderr
    # a server that answers, but no login
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.run(
            sync,
            env={**env, "WANDB_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
    assert proc.returncode == 2
    assert "fix: `wandb login`" in proc.stderr and "the local runs are untouched" in proc.stderr
    assert len(list(sweep.glob("runs/*/wandb/offline-run-*/*.wandb"))) == 1


def test_sweep_to_report_end_to_end(tmp_path):
    """A real (tiny-model) sweep with control, IP and PTST points, then `ipsweep analyze`."""
    sweep = tmp_path / "sweep"
    launch(
        "-m",
        *TINY,
        "prompt=none,caps_strong,safety",
        "train.seed=0,1",
        "elicit.logprob_items=4",
        "primary.estimator=logprob",
        sweep_dir=sweep,
    )
    assert len(records(sweep)) == 4, "2 seeds x (control, IP); PTST reuses the control's runs"
    declared = json.loads((sweep / "sweep.json").read_text())["primary"]
    assert declared["runs_before"] == 0 and declared["test"]["statistic"] == "spearman", declared
    out = ipsweep_cli("analyze", str(sweep), "--wandb-mode", "disabled")
    assert "ptst:safety" in out and "ip:caps_strong" in out
    import pandas as pd

    effects = pd.read_csv(sweep / "analysis" / "effects.csv").set_index("arm")
    for arm in ("ip:caps_strong", "ptst:safety"):
        row = effects[effects.index == arm].iloc[0]
        assert row.seeds == 2 and row["items"] == 10 and row.effect_lo <= row.effect <= row.effect_hi
    report = (sweep / "analysis" / "report.md").read_text()
    assert report.count("ptst:safety") >= 2
    assert pd.read_csv(sweep / "analysis" / "primary.csv").pre_registered.item()
    # provenance: the analysis, the runs' model, code and machine, and the sweep command
    assert "with ipsweep 0.1.0" in report and "runs: model tiny_random; made by ipsweep commit" in report
    assert "- evaluated by: hf 5." in report and "(fp32)" in report
    assert "- sweep command: `python launch.py -m " in report and "prompt=none,caps_strong,safety" in report


def test_extending_a_run_resumes_its_wandb_run_and_logs_only_new_epochs(tmp_path):
    from conftest import wandb_offline_runs

    sweep = tmp_path / "sweep"
    no_epochs = [a for a in TINY if not a.startswith("train.epochs")]
    launch(
        *no_epochs,
        "logger=wandb",
        "prompt=caps_strong",
        "elicit.logprob_items=4",
        "train.epochs=1",
        sweep_dir=sweep,
    )
    launch(
        *no_epochs,
        "logger=wandb",
        "prompt=caps_strong",
        "elicit.logprob_items=4",
        "train.epochs=2",
        sweep_dir=sweep,
    )
    (folder,) = sweep.glob("runs/*/wandb")
    first, second = wandb_offline_runs(folder)
    assert first["id"] == second["id"], "one W&B run per ipsweep run"
    epochs = [[h["epoch"] for h in r["history"] if "epoch" in h] for r in (first, second)]
    assert epochs == [[0, 1], [2]], "the extension logs epoch 2 only"
    steps = [h["train/global_step"] for r in (first, second) for h in r["history"] if "train/step_loss" in h]
    assert steps == [1, 2, 3, 4], "per-step training loss, continuing across the extension"
    config = first["config"]
    assert (
        config["setting"] == "trait_pair" and config["condition"] == "ip" and config["model"] == "tiny_random"
    )
    assert config["prompt"] == "caps_strong" and config["role"] == "inoculation"
    assert {"elicitation/logprob/estimate", "elicitation/sampled/lo"} <= set(first["summary"]), first[
        "summary"
    ]
    assert config["seed"] == 0 and "signature" in config and config["setting_config"]["name"] == "trait_pair"
