"""How a job loads its model on a GPU node, checked on the CPU: QLoRA (model.quantization=4bit; bitsandbytes
runs on the CPU too), the attention kernel, the placement (straight onto the GPU, or spread over several),
what of it enters a run's identity, and bad values refused before any job starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, launch

from ipsweep import models, store
from ipsweep.errors import ConfigError
from ipsweep.plan import plan

QLORA_OVERLAY = ROOT / ".venv" / "qlora"  # bitsandbytes, installed there by the Makefile (`make venv`)

# Run with the overlay on the path (as `pip install 'ipsweep[qlora]'` would have it): the whole job on a 4-bit
# tiny model, with the warnings it raised.
QLORA_JOB = """
import json, sys, warnings
sys.path.insert(0, "tests")
from conftest import TINY, CONF
from hydra import compose, initialize_config_dir
import bitsandbytes as bnb
from ipsweep import job, models, store
from ipsweep.plan import plan
store_dir, cache = sys.argv[1], sys.argv[2]
with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
    def make(*o):
        return compose("config", overrides=[*TINY, f"store_dir={store_dir}", f"elicit.cache_dir={cache}", *o])
    cfg = make("model.quantization=4bit", "train.epochs=2", "train.lr=5e-3")
    plain = make("train.epochs=2", "train.lr=5e-3")
model, _ = models.load(cfg.model)
q_proj = model.model.layers[0].self_attn.q_proj
del model
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    job.run(cfg)
print(json.dumps({
    "linear4bit": isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4",
    "no_gradient_warnings": [str(w.message)[:200] for w in caught if "autograd kernel" in str(w.message)],
    "own_run": plan(cfg).signature != plan(plain).signature,
}))
"""


@pytest.mark.heavy
def test_a_qlora_job_trains_a_4bit_base_and_is_its_own_run(tmp_path):
    """The whole job (evaluate, train, evaluate, record) on a 4-bit NF4 base: the base's linear layers really
    are 4-bit, every backward pass has a gradient kernel (bitsandbytes' CPU inference layout has none), the
    adapter trains (the loss falls), and the run is not the unquantized one."""
    assert (QLORA_OVERLAY / "bitsandbytes").is_dir(), f"no bitsandbytes in {QLORA_OVERLAY}; run `make venv`"
    env = {**os.environ, "PYTHONPATH": str(QLORA_OVERLAY), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", QLORA_JOB, str(tmp_path / "sweep"), str(tmp_path / "cache")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"linear4bit": True, "no_gradient_warnings": [], "own_run": True}
    (record,) = store.records(tmp_path / "sweep")
    assert record["status"] == "done" and record["config"]["inputs"]["quantization"] == "4bit"
    first, last = record["epochs"]["1"]["losses"], record["epochs"]["2"]["losses"]
    assert sum(last) / len(last) < sum(first) / len(first)


def test_quantization_without_bitsandbytes_is_refused_before_any_job(make_cfg):
    with pytest.raises(ConfigError, match="needs bitsandbytes, which is not installed; fix: `pip install"):
        plan(make_cfg("model.quantization=4bit"))


def test_quantization_and_attention_kernel_enter_the_identity_and_placement_does_not(make_cfg, monkeypatch):
    monkeypatch.syspath_prepend(str(QLORA_OVERLAY))  # the pre-flight looks for bitsandbytes

    def sig(*o):
        return plan(make_cfg(*o)).signature

    plain = sig()
    assert len({plain, sig("model.quantization=4bit"), sig("model.attn_implementation=eager")}) == 3
    assert sig("model.device=cuda", "model.device_map=auto") == sig("model.device=cuda")
    # absent options leave the inputs as before they existed, so earlier runs keep their signatures
    assert set(plan(make_cfg()).inputs) == {"data", "model_weights", "device", "dtype"}


def test_load_options_put_the_model_straight_on_the_gpu_or_spread_it(make_cfg):
    """On a GPU the weights are loaded onto it (no full copy in host RAM first); device_map=auto spreads them
    over the job's GPUs; 4-bit computes in the run's dtype."""
    options = models.load_options(make_cfg("model.device=cuda").model, "cuda", "bf16")
    assert options == {"device_map": {"": 0}}
    assert models.load_options(make_cfg().model, "cpu", "fp32") == {}
    spread = models.load_options(
        make_cfg("model.device=cuda", "model.device_map=auto", "model.attn_implementation=sdpa").model,
        "cuda",
        "bf16",
    )
    assert spread == {"device_map": "auto", "attn_implementation": "sdpa"}
    q = models.load_options(make_cfg("model.quantization=4bit").model, "cuda", "bf16")["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16


def test_the_attention_kernel_asked_for_is_the_one_the_model_runs(make_cfg):
    model, _ = models.load(make_cfg("model.attn_implementation=eager").model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.quantization=8bit"], "model.quantization=8bit is unknown"),
        (["model.attn_implementation=flash"], "model.attn_implementation=flash is unknown"),
        (["model.device_map=balanced"], "model.device_map=balanced is unknown"),
        (["model.device=cpu", "model.device_map=auto"], "spreads a model over GPUs"),
        (["model.device=cpu", "model.attn_implementation=flash_attention_2"], "runs on a GPU only"),
        (["model.quantization=4bit", "eval.engine=vllm"], "serve the unquantized base model"),
    ],
)
def test_bad_loading_options_are_refused_before_any_job(make_cfg, monkeypatch, overrides, message):
    monkeypatch.syspath_prepend(str(QLORA_OVERLAY))
    with pytest.raises(ConfigError, match=message):
        plan(make_cfg(*overrides))


def test_a_missing_kernel_package_stops_the_sweep_before_any_job(tmp_path):
    """flash_attention_2 without flash_attn installed (this machine): the pre-flight says so and launches
    nothing."""
    proc = launch(
        "-m", *TINY, "model.attn_implementation=flash_attention_2", sweep_dir=tmp_path / "s", check=False
    )
    assert proc.returncode != 0
    assert "needs the flash_attn package" in proc.stderr and not (tmp_path / "s" / "runs").exists()
