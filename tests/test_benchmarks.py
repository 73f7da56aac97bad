"""The benchmarks run, and the speed-ups they measure change no number (tiny model, small sizes)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


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
        "--model",
        "tiny_random",
        "--n",
        "12",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "5",
    )
    assert r["identical_outputs"] == "12/12", r["differing"]


def test_epochs_axis_trains_each_epoch_once(tmp_path):
    r = bench("epochs_axis", tmp_path, "--model", "tiny_random", "--n-train", "16", "--n-eval", "2")
    assert r["same_losses_as_single_run"] is True
    assert r["rows"][1]["epochs_trained"] == 3 and r["attempts_in_sweep"] == 3
