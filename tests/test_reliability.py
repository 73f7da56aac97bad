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

pytestmark = pytest.mark.heavy  # launch.py sweeps in subprocesses

LONGER = [
    *TINY[:2],
    "train.n_train=64",
    "train.batch_size=8",
    "eval.n_eval=40",
    "eval.max_new_tokens=24",
    "train.epochs=4",
    "prompt=caps_strong",
]


def _record(sweep):
    try:
        return json.loads(next(sweep.glob("runs/*/record.json")).read_text())
    except (StopIteration, json.JSONDecodeError):
        return None


def test_kill_9_mid_training_then_rerun_resumes_to_the_same_result(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        "-m",
        *LONGER,
        f"hydra.sweep.dir={sweep}",
        f"elicit.cache_dir={tmp_path / 'elicit_cache'}",
    ]
    job = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not ((r := _record(sweep)) and "1" in r["epochs"]) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed = _record(sweep)
    assert "4" not in killed["epochs"], "the job finished before the kill; make it longer"
    assert killed["status"] == "running"
    status = ipsweep_cli("status", str(sweep))
    assert (
        "| interrupted" in status
        and f"a rerun resumes after epoch {max(map(int, killed['epochs']))}" in status
    )
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
    assert "sweep finished: 1 done, 1 failed (of 2 points)" in proc.stdout + proc.stderr
    assert "failed: job #1" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    by_path = {r["config"]["model"]["path"]: r for r in records(sweep)}
    assert by_path[str(good)]["status"] == "done"
    failed = by_path[str(bad)]
    assert failed["status"] == "failed" and failed["error"]["type"] == "DivergedError"
    assert (
        "training loss became nan at step" in failed["error"]["message"]
        and "fix: lower train.lr" in failed["error"]["message"]
    )
    assert "1" not in failed["epochs"], "no epoch of a diverged run is recorded as a result"
    status = ipsweep_cli("status", str(sweep))
    assert "1 done" in status and "1 failed" in status and "DivergedError" in status
    out = ipsweep_cli("analyze", str(sweep), "--wandb-mode", "disabled")
    assert (
        "1 run(s) not done, left out of every table:" in out and "failed: " in out and "DivergedError" in out
    )


@pytest.mark.parametrize(
    "where, target, knobs",
    [
        (
            "training",
            "transformers.Trainer.training_step",
            [  # it has retried at micro-batches of 4, 2 and 1 (tests/test_train.py) before it says this
                "at a micro-batch of 1 (train.batch_size=8 x train.grad_accum=1",
                "fix: lower train.max_length, set train.gradient_checkpointing=true",
            ],
        ),
        (
            "generating",
            "transformers.GenerationMixin.generate",
            [
                "eval.batch_size=32",
                "fix: lower eval.batch_size (a new run identity: on a GPU the batch shape can change "
                "results) or eval.max_new_tokens",
            ],
        ),
    ],
)
def test_out_of_memory_names_the_knobs_and_is_recorded(make_cfg, monkeypatch, where, target, knobs):
    import torch

    from ipsweep import job
    from ipsweep.errors import OutOfMemory

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(target, oom)
    # the untrained model is not evaluated, so the first generation is after training
    cfg = make_cfg("eval.base=false")
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
    # The server answers but W&B cannot start a run (bad key, broken server): the job goes on without it.
    import http.server
    import threading

    # answers every request 501
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    sweep = tmp_path / "sweep"
    try:
        proc = launch(*TINY, "logger=wandb", "logger.mode=online", sweep_dir=sweep)
    finally:
        server.shutdown()
    out = proc.stdout + proc.stderr
    assert "W&B init failed" in out and "results are still recorded locally" in out
    (rec,) = records(sweep)
    assert rec["status"] == "done" and "1" in rec["epochs"]


@pytest.mark.parametrize("choice", ["offline", "fail"])
def test_online_mode_without_network_is_detected_in_seconds(tmp_path, monkeypatch, choice):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    sweep = tmp_path / "sweep"
    proc = launch(
        "-m",
        *TINY,
        "logger=wandb",
        "logger.mode=online",
        f"logger.on_no_network={choice}",
        "train.seed=0,1",
        sweep_dir=sweep,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if choice == "fail":
        assert proc.returncode == 1 and "cannot be reached (3 s); fix:" in out and "Traceback" not in out
        assert not (sweep / "runs").exists()
    else:
        assert proc.returncode == 0 and out.count("cannot be reached: logging offline instead") == 1, out
        assert len(list(sweep.glob("runs/*/wandb/offline-run-*"))) == 2


def test_eight_concurrent_jobs_share_one_store_and_cache(tmp_path):
    sweep = tmp_path / "sweep"
    no_epochs = [a for a in TINY if not a.startswith("train.epochs")]
    # submitit_local starts all 8 at once; epochs=1,2 pairs share a run and take turns on its lock.
    launch(
        "-m",
        *no_epochs,
        "hydra/launcher=submitit_local",
        "prompt=none,caps_strong",
        "train.seed=0,1",
        "train.epochs=1,2",
        sweep_dir=sweep,
        timeout=1200,
    )
    recs = records(sweep)
    assert len(recs) == 4 and all(
        r["status"] == "done" and sorted(r["epochs"]) == ["0", "1", "2"] for r in recs
    )
    assert all(r["epochs"]["1"]["steps"] == 2 and r["epochs"]["2"]["steps"] == 2 for r in recs), (
        "no epoch trained twice"
    )
    assert len(list(sweep.glob("runs/*/record.json"))) == 4
    assert len(json.loads((sweep / "sweep.json").read_text())["points"]) == 8
    cache = list((tmp_path / "elicit_cache").rglob("*.json"))
    assert cache and all(json.loads(p.read_text()) for p in cache), "every cache entry is complete JSON"
    assert not list(sweep.rglob("*.tmp")) and not list((tmp_path / "elicit_cache").rglob("*.tmp"))
    by_prompt = {}
    for r in recs:
        by_prompt.setdefault(r["prompt"], []).append(r["elicitation"])
    assert all(e[0] == e[1] for e in by_prompt.values()), (
        "one cached elicitation per prompt, shared by both seeds"
    )
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
    bad.write_text(
        text[: len(text) // 2] if damage == "truncated" else json.dumps({"status": "done", "epochs": {}})
    )
    status = ipsweep_cli("status", str(sweep))
    assert "| corrupt" in status and str(bad) in status and "1 done" in status
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ipsweep")), "analyze", str(sweep), "--wandb-mode", "disabled"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "1 damaged run record(s)" in proc.stderr and str(bad) in proc.stderr
    assert "--skip-damaged" in proc.stderr and "Traceback" not in proc.stderr
    out = ipsweep_cli("analyze", str(sweep), "--skip-damaged", "--wandb-mode", "disabled")
    assert "control" in out and str(bad) in (sweep / "analysis" / "report.md").read_text()
    proc = launch(*args, sweep_dir=sweep)
    kept = list(bad.parent.glob("record.damaged-*.json"))
    assert len(kept) == 1 and kept[0].read_text() != text, "the damaged file is kept, not overwritten"
    assert (
        "damaged run record" in proc.stdout + proc.stderr and str(kept[0].name) in proc.stdout + proc.stderr
    )
    assert all(r["status"] == "done" for r in records(sweep)) and len(records(sweep)) == 2


def test_ctrl_c_ends_with_one_line_and_no_traceback(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        *[a for a in TINY if not a.startswith("train.epochs")],
        "train.epochs=200",
        f"hydra.run.dir={sweep}",
        f"hydra.sweep.dir={sweep}",
        f"elicit.cache_dir={tmp_path / 'ec'}",
    ]
    # An ignored SIGINT survives exec: a shell starts a background job (`pytest ... &`, as CI may) with SIGINT
    # ignored, and the job this test starts would inherit that and run to the end. Start it as a terminal
    # would.
    inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def as_from_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=as_from_a_terminal,
    )
    record = sweep / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and not any('"1": {' in p.read_text() for p in record.glob("*/record.json")):
        time.sleep(0.5)
    for _ in range(3):  # as a user presses Ctrl-C again when the first press lands where Python drops it
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (
        f"exit {proc.returncode} (pytest's SIGINT handler, mask: {inherited}); stderr: {err[-1500:]}"
    )
    assert "Traceback" not in out + err, err[-3000:]
    assert "is recorded as interrupted after epoch" in out + err and "run the same command again" in out + err
    (rec,) = records(sweep)
    assert rec["status"] == "interrupted"
