"""Shared fixtures: compose the real config (as launch.py does) and shrink it for a tiny random model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ipsweep.config import register

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_SILENT"] = "true"
register()

# Small enough that a whole job takes a few seconds on 2 CPU cores.
TINY = ["model=tiny_random", "logger=none", "train.n_train=16", "train.batch_size=8", "eval.n_eval=10",
        "eval.max_new_tokens=6", "train.epochs=1"]


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, tiny: bool = True):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[*(TINY if tiny else []), f"store_dir={tmp_path / 'sweep'}",
                                                f"elicit.cache_dir={tmp_path / 'elicit_cache'}", *overrides])
    return make


def launch(*args: str, sweep_dir: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run launch.py in a subprocess, as a user would, writing the sweep to `sweep_dir`."""
    # Each test gets its own elicitation cache, so no test reads another's results.
    cmd = [sys.executable, str(ROOT / "launch.py"), *args, f"hydra.sweep.dir={sweep_dir}", f"hydra.run.dir={sweep_dir}",
           f"elicit.cache_dir={sweep_dir.parent / 'elicit_cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=sweep_dir.parent,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def assert_same_training(a: dict, b: dict) -> None:
    """Two run records trained the same model: per-step losses, evaluations and final LoRA weights agree."""
    import torch
    from safetensors.torch import load_file

    assert sorted(a["epochs"]) == sorted(b["epochs"])
    for e in a["epochs"]:
        assert a["epochs"][e]["evals"] == b["epochs"][e]["evals"], f"epoch {e} evaluations differ"
        if e != "0":
            assert a["epochs"][e]["losses"] == pytest.approx(b["epochs"][e]["losses"], rel=1e-4), f"epoch {e} losses differ"
    last = max(a["epochs"], key=int)
    wa, wb = (load_file(str(Path(r["epochs"][last]["checkpoint"]) / "adapter_model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def ipsweep_cli(*args: str) -> str:
    """Run the `ipsweep` console script; return its stdout."""
    proc = subprocess.run([str(Path(sys.executable).with_name("ipsweep")), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="session")
def cmv(tmp_path_factory):
    """The CMV fixture data and a running localhost judge server (tests/cmv_fixture.py)."""
    from cmv_fixture import JudgeServer, make_data

    root = tmp_path_factory.mktemp("cmv")
    server = JudgeServer()
    server.data_dir = make_data(root / "data")
    server.cache_dir = root / "judge_cache"
    yield server
    server.close()
