import json

import pytest

from ipsweep import cache, identity, prompts, store
from ipsweep.record import Record


def _sig(cfg):
    p = prompts.resolve(cfg.setting, cfg.prompt)
    return identity.signature(cfg, p.train_prompt or prompts.NO_PROMPT)


def test_signature_ignores_epochs_logger_and_library_but_not_science(make_cfg):
    base = _sig(make_cfg("prompt=caps_strong"))
    assert _sig(make_cfg("prompt=caps_strong", "train.epochs=3")) == base
    assert _sig(make_cfg("prompt=caps_strong", "logger=wandb", "name=other")) == base
    # batch shape changes bf16 logits on a GPU
    assert _sig(make_cfg("prompt=caps_strong", "eval.batch_size=4")) != base
    assert _sig(make_cfg("prompt=caps_strong", "+setting.prompts.new={text: hi, role: neutral}")) == base
    assert _sig(make_cfg("prompt=caps_strong", "train.seed=1")) != base
    assert _sig(make_cfg("prompt=caps_strong", "train.lr=1e-4")) != base
    assert _sig(make_cfg("prompt=caps_weak")) != base
    assert _sig(make_cfg("prompt=caps_strong", "setting.prompts.caps_strong.text=Shout.")) != base
    # test-time prompts do not change the trained model; a PTST point is the control's run
    assert (
        _sig(make_cfg("prompt=caps_strong", "eval.test_grid=true", "eval.extra_test_prompts=[safety]"))
        == base
    )
    assert _sig(make_cfg("prompt=safety")) == _sig(make_cfg("prompt=none"))


def test_the_engine_enters_the_signature_and_how_it_runs_does_not(make_cfg):
    """vLLM's outputs may differ from HF's, so the engine is part of a run's identity; the default (hf)
    leaves the config as it was before engines existed, so earlier runs keep their signatures."""
    hf = make_cfg("prompt=caps_strong")
    assert "engine" not in identity.semantic_config(hf, prompts.NO_PROMPT)["eval"]
    assert "vllm" not in identity.semantic_config(hf, prompts.NO_PROMPT)["eval"]
    vllm = _sig(make_cfg("prompt=caps_strong", "eval.engine=vllm"))
    assert vllm != _sig(hf)
    how = ["eval.vllm.python=/opt/v/bin/python", "eval.vllm.min_agreement=0.5", "eval.vllm.gate_prompts=2"]
    assert _sig(make_cfg("prompt=caps_strong", "eval.engine=vllm", *how)) == vllm


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "r" / "record.json"
    cache.atomic_write_json(path, {"a": 1})
    cache.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


# nested past the recursion limit
@pytest.mark.parametrize(
    "text,reason",
    [
        ('{"status": "done", "epo', "not valid JSON"),  # truncated by hand
        ('{"status": "done", "epochs": {}}', "not a run record (signature: Field required"),
        ("[" * 300000, "not valid JSON"),
    ],
)
def test_damaged_record_is_never_a_result_and_is_reported(tmp_path, text, reason):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "record.json").write_text(text)
    good, damaged = store.scan(tmp_path)
    assert good == [] and len(damaged) == 1 and reason in str(damaged[0])
    with pytest.raises(store.DamagedRecord):
        store.Run(run).load()


def test_write_interrupted_midway_keeps_the_previous_record(tmp_path, monkeypatch):
    path = tmp_path / "r" / "record.json"
    cache.atomic_write_json(path, {"status": "done", "epochs": {"1": {}}})

    def dies_halfway(data, f, **kwargs):
        f.write('{"status": "runn')
        f.flush()
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    monkeypatch.setattr(cache.json, "dump", dies_halfway)
    try:
        cache.atomic_write_json(path, {"status": "running"})
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "done", "epochs": {"1": {}}}
    assert [p.name for p in path.parent.iterdir()] == ["record.json"], "no temp file is left behind"


def test_a_point_served_by_a_longer_running_run_is_done(tmp_path):
    """epochs=1 and epochs=2 share a run: while the epochs=2 job still trains, the epochs=1 point is done."""
    from ipsweep import status

    run = store.Run(tmp_path / "runs" / "r")
    evals = {"evals": {"none": {"metrics": {}}}}
    run.save(
        Record(
            **{
                "signature": "s",
                "setting": "trait_pair",
                "prompt": "none",
                "role": "none",
                "condition": "control",
                "seed": 0,
                "model": "m",
                "status": "running",
                "behaviour_metric": "caps",
                "capability_metric": "correct",
                "config": {},
                "epochs": {"0": evals, "1": evals},
            }
        )
    )
    point = {"run_dir": str(run.dir), "epochs": 1, "test_prompts": ["none"], "base": True}
    assert status.point_state(point)["state"] == "done"
    assert status.point_state({**point, "epochs": 2})["state"] in ("running", "interrupted")


def test_analysis_logs_to_the_project_the_sweep_used(tmp_path):
    from omegaconf import OmegaConf

    from ipsweep.tracking import sweep_project

    OmegaConf.save(OmegaConf.create({"logger": {"project": "my-ip"}}), tmp_path / "multirun.yaml")
    assert sweep_project([tmp_path]) == "my-ip" and sweep_project([tmp_path / "none"]) is None


def test_a_file_version_is_hashed_once_per_machine_not_once_per_job(tmp_path, monkeypatch):
    """Weights are hashed for every run's identity; each job is a new process, so the digest of a file version
    (path, size, modification time) is kept on disk and a later job reads it instead of the file."""
    import hashlib
    import os

    from ipsweep.cache import _digest, file_digest

    monkeypatch.setenv("IPSWEEP_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = file_digest(weights)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()[:16]
    stat = weights.stat()
    weights.write_bytes(b"b" * 4096)  # other bytes under the same size and time: only the cache knows `first`
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _digest.cache_clear()  # the next job's process
    assert file_digest(weights) == first, "the digest was read from the on-disk cache, not recomputed"
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version of the file
    assert file_digest(weights) == hashlib.sha256(b"b" * 4096).hexdigest()[:16]


def test_every_committed_record_loads_and_declares_every_key_it_holds():
    """The record model names every key a job writes (old records, with fewer keys, still load), and a loaded
    record dumps back to the same JSON."""
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parent.parent / "docs" / "results").glob("*/runs/*/record.json"))
    assert paths, "no committed records found"
    undeclared = set()
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        record = store.load_record(path)
        parts = [("Record", record), *(("Attempt", a) for a in record.attempts)]
        for epoch in record.epochs.values():
            parts += [("Epoch", epoch), *(("Evaluation", e) for e in epoch.evals.values())]
        undeclared |= {f"{kind}.{key}" for kind, part in parts for key in part.model_extra or {}}
        assert record.dump() == data, f"{path} does not dump back to what it holds"
    assert not undeclared, f"keys the record model does not declare: {sorted(undeclared)}"
