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
# `make test` runs the suite on pytest-xdist workers: each gets its share of the cores (torch, and the jobs
# and engines tests start, read OMP_NUM_THREADS), since two workers with a thread per core each oversubscribe
# the machine (HF generation measured 4-36x slower on 2 cores).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))
register()


def pytest_collection_modifyitems(items):
    """Longest first (real models and SLURM, then the heavy tests): the workers share the long tests at the
    start and the suite ends on short ones, not on one worker's last real-model test."""

    def rank(item) -> int:
        if item.get_closest_marker("slow") or item.get_closest_marker("slurm"):
            return 0
        return 1 if item.get_closest_marker("heavy") else 2

    items.sort(key=rank)


# Small enough that a whole job takes a few seconds on 2 CPU cores.
TINY = [
    "model=tiny_random",
    "logger=none",
    "train.n_train=16",
    "train.batch_size=8",
    "eval.n_eval=10",
    "eval.max_new_tokens=6",
    "train.epochs=1",
]


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, tiny: bool = True):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    *(TINY if tiny else []),
                    f"store_dir={tmp_path / 'sweep'}",
                    f"elicit.cache_dir={tmp_path / 'elicit_cache'}",
                    *overrides,
                ],
            )

    return make


def launch(
    *args: str, sweep_dir: Path, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run launch.py in a subprocess, as a user would, writing the sweep to `sweep_dir`."""
    # Each test gets its own elicitation cache, so no test reads another's results.
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        *args,
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.run.dir={sweep_dir}",
        f"elicit.cache_dir={sweep_dir.parent / 'elicit_cache'}",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=sweep_dir.parent,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def assert_same_training(a: dict, b: dict) -> None:
    """Two run records trained the same model: per-step losses, evaluations and final LoRA weights agree."""
    import torch
    from safetensors.torch import load_file

    assert sorted(a["epochs"]) == sorted(b["epochs"])
    for e in a["epochs"]:
        assert a["epochs"][e]["evals"] == b["epochs"][e]["evals"], f"epoch {e} evaluations differ"
        if e != "0":
            assert a["epochs"][e]["losses"] == pytest.approx(b["epochs"][e]["losses"], rel=1e-4), (
                f"epoch {e} losses differ"
            )
    last = max(a["epochs"], key=int)
    wa, wb = (
        load_file(str(Path(r["epochs"][last]["checkpoint"]) / "adapter_model.safetensors")) for r in (a, b)
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def ipsweep_cli(*args: str) -> str:
    """Run the `ipsweep` console script; return its stdout."""
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ipsweep")), *args], capture_output=True, text=True
    )
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


def wandb_offline_runs(folder: Path) -> list[dict]:
    """What W&B recorded in each offline run under `folder` (read back from its .wandb file): run id, config
    and history rows. The .wandb file is a LevelDB-style log of protobuf records; wandb 0.31 ships no Python
    reader for it, so this is the minimal one (header ':W&B' + 3 bytes, 32 KiB blocks, 7-byte record
    headers)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    def chunks(data: bytes):
        pos, block, buf = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 1:
                yield chunk
            elif kind in (2, 3):
                buf = (buf if kind == 3 else b"") + chunk
            elif kind == 4:
                yield buf + chunk

    out = []
    for path in sorted(folder.glob("offline-run-*/*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path} is not a W&B log"
        run = {"id": None, "config": {}, "history": [], "summary": {}}
        for raw in chunks(data):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"] = rec.run.run_id
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "summary":
                run["summary"].update(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update}
                )
            elif kind == "history":
                run["history"].append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                )
        out.append(run)
    return out


@pytest.fixture
def cpu_load():
    """Busy processes, two per core, for as long as the test runs: a loaded machine. Each in its own
    session, as other users' jobs are, so the scheduler's per-session groups share the cores among them."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(2 * (os.cpu_count() or 1))
    ]
    yield len(burners)
    for b in burners:
        b.kill()
        b.wait()
