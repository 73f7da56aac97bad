"""The benchmarks run, and the speed-ups they measure change no number (tiny model, small sizes)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from ipsweep import models


def bench(script: str, tmp_path, *args: str, name: str | None = None) -> dict:
    env = {**os.environ, "IPSWEEP_BENCH_RESULTS": str(tmp_path)}
    subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return json.loads((tmp_path / f"{name or script}-cpu.json").read_text())


@pytest.mark.heavy
def test_training_speedups_keep_the_reference_losses(tmp_path):
    r = bench(
        "train_throughput",
        tmp_path,
        "--model",
        "tiny_random",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "t"),
        name="train_throughput_gcd_sycophancy",
    )
    assert [row["arm"] for row in r["rows"]][0].startswith("reference")
    # the default path: same losses as the authors' way
    assert r["max_abs_step_loss_diff_same_batches"] < 1e-4
    ref, default = r["rows"][0], r["rows"][1]
    assert default["held_out_loss"] == pytest.approx(ref["held_out_loss"], rel=0.02)
    # only the reference pads to 415
    assert ref["padding_share"] > 0.2 and default["padding_share"] < ref["padding_share"]


def test_batched_generation_gives_the_one_at_a_time_outputs(tmp_path):
    r = bench(
        "eval_generation",
        tmp_path,
        "--model",  # the model overrides a job takes
        f"model=hf model.path={models.prepare_tiny_random()} model.name=tiny",
        "--n",
        "12",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "5",
    )
    assert r["identical_outputs"] == "12/12", r["differing"]


@pytest.mark.heavy
def test_epochs_axis_trains_each_epoch_once(tmp_path):
    r = bench("epochs_axis", tmp_path, "--model", "tiny_random", "--n-train", "16", "--n-eval", "2")
    assert r["same_losses_as_single_run"] is True
    assert r["rows"][1]["epochs_trained"] == 3 and r["attempts_in_sweep"] == 3


@pytest.mark.heavy
def test_the_gpu_check_runs_every_step_at_toy_sizes(tmp_path):
    """benchmarks/gpu_check.py, the one command a lent GPU runs, cannot rot: on the CPU at toy sizes every
    step writes its result, the training arms train through ipsweep's trainer, the sweep point ends done."""
    subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "IPSWEEP_BENCH_RESULTS": str(tmp_path / "results")},
        check=True,
        capture_output=True,
        timeout=600,
    )
    steps = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    steps_in_order = [
        "env",
        "train_qwen2-1.5b",
        "train_qwen2-1.5b_checkpointing",
        "train_llama-3-8b",
        "train_llama-3-8b_checkpointing",
        "generate",
        "sweep_point",
    ]
    assert set(steps) == set(steps_in_order)
    assert all(s["ok"] for s in steps.values()), [s.get("error") for s in steps.values()]
    train = steps["train_llama-3-8b_checkpointing"]
    assert train["tokens_per_s"] > 0 and train["gradient_checkpointing"] and train["estimated_gb"] > 0
    assert steps["generate"]["speedup"] > 1
    point = steps["sweep_point"]
    assert point["exit"] == 0 and point["status"] == "done" and point["train_s"] is not None
    kept = json.loads((tmp_path / "results" / "gpu_check-tiny-cpu.json").read_text())
    assert [s["step"] for s in kept["steps"]] == [*steps_in_order]
