"""The cost estimate `--dry-run` prints (ipsweep/cost.py): the sweep's work, its time from earlier runs'
records, and where there are none the rule, which must come close to what the committed CPU runs took."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipsweep import cost, store

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
SMOLLM2 = {"_target_": "ipsweep.models.smollm2_135m", "name": "smollm2_135m"}


def test_cost_estimate_uses_the_measured_rates_and_warns_at_the_time_limit():
    point = {
        "num": 0,
        "run_dir": "runs/a",
        "setting": "trait_pair",
        "epochs": 2,
        "test_prompts": ["none", "caps_strong"],
        "inputs": {"device": "cuda"},
        "n_train": 100,
        "n_eval": 50,
        "config": {
            "model": {"name": "qwen"},
            "setting": {"name": "trait_pair"},
            "train": {"max_length": 256, "gradient_checkpointing": False},
            "eval": {"samples_per_prompt": 1, "max_new_tokens": 10, "batch_size": 32},
        },
    }
    rates = {("qwen", "trait_pair", "cuda", "lora"): {"train": 3.0, "eval": 0.01, "runs": 4}}
    # 100 examples x 2 epochs x 3 s + 2 prompts x 2 epochs x 50 items x 10 tokens x 0.01 s = 600 + 20 s
    text = cost.estimate([point], {}, rates, limit_min=10)
    assert "~10 min of GPU time for 1 trainings" in text and "timed by 4 earlier runs" in text
    assert "warning: 1 jobs would pass the SLURM time limit (hydra.launcher.timeout_min=10)" in text
    assert "warning" not in cost.estimate([point], {}, rates, limit_min=11)
    # a run that holds its 2 epochs already costs nothing more
    assert "1 trainings (1 already trained), 0 epochs" in cost.estimate([point], {"runs/a": 2}, rates, None)
    # no earlier run and no rule for the device: no time, and it says why
    mps = {**point, "inputs": {"device": "mps"}}
    assert "no finished run to time it by and no rule for it" in cost.estimate([mps], {}, {}, None)
    # a full fine-tune is timed by earlier full fine-tunes only, and says so
    full = {**mps, "config": {**point["config"], "train": {**point["config"]["train"], "method": "full"}}}
    rates_mps = {("qwen", "trait_pair", "mps", "lora"): rates[("qwen", "trait_pair", "cuda", "lora")]}
    assert "(mps, full fine-tune): no finished run to time it by" in cost.estimate(
        [full], {}, rates_mps, None
    )


@pytest.mark.parametrize("sweep", sorted(p.name for p in RESULTS.iterdir() if p.is_dir()))
def test_the_rule_times_each_committed_cpu_sweep_within_2x(sweep):
    """The rule's training and evaluation seconds, summed over a committed sweep's runs, against the seconds
    its records hold (SmolLM2-135M on 2 CPU cores)."""
    ruled, measured = [], []
    for record in (r for r in store.records(RESULTS / sweep) if r["status"] == "done"):
        c, epochs = record["config"], [e for k, e in record["epochs"].items() if k != "0"]
        items = sum(len(v["items"]) for e in epochs for v in e["evals"].values())
        run = {
            "model_cfg": SMOLLM2,
            "setting_cfg": c["setting"],
            "n_train": record["n_train"],
            "max_length": c["train"]["max_length"],
            "checkpointing": False,
            "full": c["train"].get("method") == "full",
            "batch": c["eval"].get("batch_size", 32),
            "bytes": 4,
            "example_epochs": record["n_train"] * len(epochs),
            "item_tokens": items * c["eval"]["max_new_tokens"] * c["eval"]["samples_per_prompt"],
        }
        (seconds,), basis = cost.rule_seconds([run], "cpu")
        ruled.append(seconds)
        measured.append(sum(e["train_s"] + e["eval_s"] for e in epochs))
    assert "134.5M parameters" in basis
    ratio = sum(ruled) / sum(measured)
    assert 0.5 < ratio < 2, f"the rule gives {ratio:.2f}x the measured time of {sweep}"


def test_a_measured_rate_counts_every_item_generated_for():
    """gcd's metrics each apply to a part of the 60 items (20 each): the rate is per item generated for."""
    record = next(r for r in store.records(RESULTS / "gcd_sycophancy_cpu") if r["status"] == "done")
    epochs = [e for k, e in record["epochs"].items() if k != "0"]
    generated = sum(len(v["items"]) for e in epochs for v in e["evals"].values())
    assert generated == 60 * len(epochs)
    _, per_item = cost._rates_of(record)
    seconds = sum(e["eval_s"] for e in epochs)
    assert per_item == pytest.approx(seconds / (generated * record["config"]["eval"]["max_new_tokens"]))
