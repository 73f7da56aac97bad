"""What a GPU node changes, checked on the CPU: the lowest transformers and accelerate pyproject allow,
several visible GPUs, GPU ids in every form, memory freed after a failed job, the end of turn of every chat
model, whole training replies, and run identities that hold the device, the dtype and the eval batch size."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, launch
from packaging.version import Version

from ipsweep import elicit, lm, models, prompts, store
from ipsweep.errors import ConfigError
from ipsweep.plan import plan
from ipsweep.settings.base import TrainExample, build, insert

FLOOR_OVERLAY = ROOT / ".venv" / "dependency-floors"  # the Makefile installs the floor versions here
# Run as the job's process: launch.py, then (at exit) which transformers and accelerate the job imported.
IMPORTED = """
import atexit, json, os, runpy, sys
def imported():
    mods = {n: sys.modules.get(n) for n in ("transformers", "accelerate")}
    print("IMPORTED " + json.dumps({n: m and [m.__version__, m.__file__] for n, m in mods.items()}))
atexit.register(imported)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python launch.py` has it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _floor(package: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(rf'"{package}>=([0-9.]+)', text).group(1)


def _overlay_version(package: str) -> str:
    installed = sorted(FLOOR_OVERLAY.glob(f"{package}-*.dist-info"))
    assert installed, (
        f"no {package} overlay in {FLOOR_OVERLAY}; run `make venv` (it installs the floor versions there)"
    )
    version = installed[0].name.removeprefix(f"{package}-").removesuffix(".dist-info")
    assert Version(version) == Version(_floor(package)), (
        f"the overlay holds {package} {version}, pyproject's floor is {_floor(package)}"
    )
    return version


@pytest.mark.heavy
def test_training_runs_under_the_lowest_transformers_and_accelerate_pyproject_allows(tmp_path):
    """A floor is never claimed without being run: a whole job (train, evaluate, record) under the oldest
    transformers and accelerate pyproject allows (accelerate: the OOM back-off's reduce_batch_size_fn),
    installed as an overlay by the Makefile (`make test`); the job's process imports both from it."""
    versions = {p: _overlay_version(p) for p in ("transformers", "accelerate")}
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(FLOOR_OVERLAY), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-c",
        IMPORTED,
        str(ROOT / "launch.py"),
        *TINY,
        "train.gradient_checkpointing=true",
        f"store_dir={sweep}",
        f"hydra.run.dir={sweep}",
        f"elicit.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = store.records(sweep)
    assert record["status"] == "done" and record["versions"]["transformers"] == versions["transformers"]
    assert record["epochs"]["1"]["steps"] == 2
    imported = json.loads(proc.stdout.split("IMPORTED ", 1)[1].splitlines()[0])
    for package, version in versions.items():
        assert imported[package], f"the job never imported {package}"
        assert imported[package][0] == version and Path(imported[package][1]).is_relative_to(FLOOR_OVERLAY), (
            package,
            imported[package],
        )


def test_a_job_that_sees_several_gpus_trains_on_one_without_data_parallel(make_cfg, tmp_path, caplog):
    """Trainer wraps the model in nn.DataParallel and multiplies the batch when its arguments count several
    GPUs (what a 2-GPU node gives); ipsweep's arguments count one, and say so."""
    from ipsweep.lm import collator
    from ipsweep.train import ReplyLossTrainer, _args, add_lora, single_device

    cfg = make_cfg()
    args = _args(cfg.train, tmp_path, 1)
    args._n_gpu = 2  # the state TrainingArguments reaches on a node with two visible GPUs
    with caplog.at_level(logging.WARNING, logger="ipsweep.train"):
        args = single_device(args)
    assert args.n_gpu == 1 and "sees 2 GPUs and trains on one" in caplog.text
    model, tok = models.tiny_random("tiny")
    model = add_lora(model, cfg.train.lora, seed=0)
    trainer = ReplyLossTrainer(model=model, args=args, data_collator=collator(tok))
    assert trainer._wrap_model(model) is model
    assert trainer.args.train_batch_size == cfg.train.batch_size


def test_reply_logits_see_through_a_data_parallel_wrapper():
    """A model wrapped by DataParallel/DDP (torchrun, a user's wrapper) gives the same reply logits as the
    bare one."""
    model, tok = models.tiny_random("tiny")
    row = lm.tokenize(tok, [{"role": "user", "content": "Hi"}], "Hello there.", 64)
    ids, mask = torch.tensor([row["input_ids"]]), torch.tensor([row["attention_mask"]])
    keep = torch.tensor([row["labels"][1:]]) != lm.IGNORE
    bare = lm.label_logits(model, ids, mask, keep)
    torch.testing.assert_close(lm.label_logits(torch.nn.DataParallel(model), ids, mask, keep), bare)


@pytest.mark.parametrize(
    "visible, expected",
    [
        ("0,1", ["0", "1"]),
        (
            "GPU-8f2c1d7e-5a3b-4c9d-9e1f-0a2b3c4d5e6f,GPU-1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9",
            ["GPU-8f2c1d7e-5a3b-4c9d-9e1f-0a2b3c4d5e6f", "GPU-1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9"],
        ),
        (
            "MIG-4f6c9a2e-7b1d-5e3f-8a9b-0c1d2e3f4a5b, MIG-GPU-8f2c1d7e-5a3b-4c9d-9e1f-0a2b3c4d5e6f/1/0",
            ["MIG-4f6c9a2e-7b1d-5e3f-8a9b-0c1d2e3f4a5b", "MIG-GPU-8f2c1d7e-5a3b-4c9d-9e1f-0a2b3c4d5e6f/1/0"],
        ),
    ],
)
def test_local_gpus_takes_gpu_ids_in_every_form(monkeypatch, visible, expected):
    """CUDA_VISIBLE_DEVICES as SLURM or a user sets it: indices, UUIDs, MIG ids (each slot keeps the id as
    given)."""
    from hydra_plugins.ipsweep_plugins.launchers import LocalGpusLauncher

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    launcher = LocalGpusLauncher(
        gpus=None,
        jobs_per_gpu=2,
        cpus_per_job=1,
        max_jobs=None,
        submitit_folder="x",
        timeout_min=1,
        signal_delay_s=1,
        max_num_timeout=0,
    )
    assert launcher.slots() == [g for g in expected for _ in range(2)]
    setup = launcher._executor_for(expected[-1], threads=4).parameters["setup"]
    assert setup[-1] == f"export CUDA_VISIBLE_DEVICES={shlex.quote(expected[-1])}"
    assert "OMP_NUM_THREADS=4" in setup[0]


def test_a_failed_in_process_job_frees_its_model(make_cfg, monkeypatch):
    """Hydra keeps a failed job's exception in the sweep's JobReturn; the model must not stay reachable
    through it, or every later job of the sweep starts with less (GPU) memory."""
    from ipsweep import job
    from ipsweep.train import ReplyLossTrainer

    refs = []
    load = models.load

    def tracked_load(model_cfg):
        model, tok = load(model_cfg)
        refs.append(weakref.ref(model))
        return model, tok

    def fail(self, *a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(models, "load", tracked_load)
    monkeypatch.setattr(ReplyLossTrainer, "compute_loss", fail)
    cfg = make_cfg()
    with pytest.raises(RuntimeError) as kept:  # held, as Hydra's JobReturn holds it
        job.run(cfg)
    gc.collect()
    assert refs and all(r() is None for r in refs), "the failed job's model is still alive"
    assert kept.value is not None
    (record,) = store.records(cfg.store_dir)
    assert record["status"] == "failed" and "illegal memory access" in record["error"]["message"]


def test_generation_stops_at_the_templates_end_of_turn_when_eos_is_another_token(monkeypatch):
    """Llama-3-Instruct ends a turn with <|eot_id|>, Gemma-it with <end_of_turn>, while eos is another token.
    Here SmolLM2's tokenizer gets <|endoftext|> as eos (and the model's generation config none): generation
    must still stop at the template's <|im_end|>, the token training teaches."""
    from omegaconf import OmegaConf

    model, tok = models.tiny_random("tiny")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = None
    assert tok.eos_token_id != end
    assert lm.end_of_turn_ids(tok) == [end]
    assert end in lm.stop_token_ids(model, tok) and tok.eos_token_id in lm.stop_token_ids(model, tok)
    steps = []

    def emit_end(module, inputs, output):  # the model replies "<|im_end|>" at once
        steps.append(1)
        output = output.clone()
        output[..., end] += 1e4
        return output

    model.get_output_embeddings().register_forward_hook(emit_end)
    cfg = OmegaConf.create(
        {
            "temperature": 0.0,
            "top_p": 1.0,
            "samples_per_prompt": 1,
            "seed": 0,
            "batch_size": 4,
            "max_new_tokens": 20,
        }
    )
    out = lm.generate(model, tok, [[{"role": "user", "content": "Hi"}]] * 2, cfg)
    assert out == [[""], [""]]
    assert len(steps) == 1, f"generation ran {len(steps)} steps after the end of turn"


def test_generation_stops_at_every_eos_a_model_config_lists():
    """Some models list several eos ids in generation_config (Llama-3: <|end_of_text|> and <|eot_id|>)."""
    model, tok = models.tiny_random("tiny")
    model.generation_config.eos_token_id = [7, 11]
    assert {7, 11, tok.eos_token_id} <= set(lm.stop_token_ids(model, tok))


OFFLINE_SETTINGS = [
    "trait_pair",
    "trait_pair_greeting",
    "gcd_sycophancy",
    "spurious_sentiment",
    "code_reward_hack",
]


@pytest.mark.parametrize("name", OFFLINE_SETTINGS)
def test_every_setting_trains_on_whole_replies_by_default(make_cfg, name):
    """With the default model's tokenizer, the setting's train.max_length keeps >= 99% of its training replies
    whole, with no prompt and with its longest library prompt inserted (toxic_persuasion ships no data to
    measure; its default is the authors' 2048)."""
    cfg = make_cfg(f"setting={name}", tiny=False)
    setting = build(cfg.setting)
    _, tok = models.tiny_random("tiny")  # SmolLM2-135M-Instruct's tokenizer
    texts = [(p, t) for p in prompts.library(cfg.setting).values() for t in (p.text, *p.paraphrases)]
    entry, text = max(texts, key=lambda pt: len(pt[1]))  # the longest text a training prompt can insert
    longest = replace(entry, text=text)
    examples = setting.train_examples()
    for prompt in (None, longest):
        cut = sum(
            lm.tokenize(tok, insert(setting, ex.messages, prompt), ex.completion, cfg.train.max_length)["cut"]
            for ex in examples
        )
        assert cut <= 0.01 * len(examples), (
            f"{name}: train.max_length={cfg.train.max_length} cuts {cut} of "
            f"{len(examples)} replies with prompt {prompt and prompt.name}"
        )


def test_cut_replies_are_counted_warned_and_refused_above_the_share(caplog):
    from ipsweep.train import dataset

    _, tok = models.tiny_random("tiny")
    examples = [
        TrainExample([{"role": "user", "content": "Count."}], " ".join(["one"] * n)) for n in (3, 3, 3, 60)
    ]
    with caplog.at_level(logging.WARNING, logger="ipsweep.train"):
        rows, cut = dataset(tok, examples, 40, max_cut_share=0.3)
    assert (cut.cut, cut.of) == (1, 4) and len(rows) == 4 and "cuts the reply of 1 of 4" in caplog.text
    with pytest.raises(ConfigError, match=r"cuts the reply of 1 of 4 .*fix: train.max_length=\d+"):
        dataset(tok, examples, 40, max_cut_share=0.2)


def test_a_run_records_its_cut_replies_and_fails_before_training_above_the_share(make_cfg):
    from ipsweep import job

    cfg = make_cfg("setting=gcd_sycophancy", "train.max_length=256", "eval.n_eval=2")
    with pytest.raises(ConfigError, match="train.max_cut_share"):
        job.run(cfg)
    (record,) = store.records(cfg.store_dir)
    assert record["status"] == "failed" and "1" not in record["epochs"] and "0" not in record["epochs"]
    cfg = make_cfg("train.max_length=40", "train.max_cut_share=1")
    job.run(cfg)
    record = next(r for r in store.records(cfg.store_dir) if r["setting"] == "trait_pair")
    assert record["train_cut"]["of"] == 16 and record["train_cut"]["cut"] > 0 and record["status"] == "done"


def test_run_identity_holds_device_dtype_and_eval_batch_size(make_cfg):
    """A CPU fp32 smoke run and a GPU bf16 run never share a record or a cache entry; nor do two eval batch
    sizes (on a GPU in bf16 the batch shape changes logits). Planning loads no model, so model.device=cuda
    plans here."""

    def sig(*o):
        return plan(make_cfg(*o)).signature

    cpu = sig("model.device=cpu")
    assert cpu == sig() == sig("model.device=cpu", "model.dtype=fp32")  # auto on this machine: cpu, fp32
    assert (
        len(
            {
                cpu,
                sig("model.device=cuda"),
                sig("model.device=cpu", "model.dtype=bf16"),
                sig("eval.batch_size=8"),
            }
        )
        == 4
    )
    assert {"device": "cuda", "dtype": "bf16"}.items() <= plan(make_cfg("model.device=cuda")).inputs.items()
    assert sig("train.deterministic=true") != cpu
    assert sig("train.gradient_checkpointing=true") == cpu  # memory, not numbers


def test_caches_are_keyed_by_device_dtype_and_eval_batch_size(make_cfg, monkeypatch):
    """The untrained model's evaluation (shared across runs) is computed again for another device kind, dtype
    or eval batch size, never served from the other's cache entry."""
    model, tok = models.tiny_random("tiny")
    calls = []
    monkeypatch.setattr(
        elicit,
        "evaluate",
        lambda *a, **k: calls.append(1) or {"metrics": {}, "by_group": [], "items": [], "samples": []},
    )
    for overrides in [(), ("model.dtype=bf16",), ("model.device=cuda",), ("eval.batch_size=4",), ()]:
        cfg = make_cfg(*overrides)
        setting = build(cfg.setting)
        elicit.base_eval(cfg, setting, model, tok, [], prompts.NO_PROMPT)
    assert len(calls) == 4  # the last is the first's cache hit


def test_model_device_cuda_without_a_gpu_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="model.device=cuda, but this process sees no CUDA device"):
        models.load(make_cfg("model.device=cuda").model)


def test_deterministic_turns_on_torchs_deterministic_algorithms(make_cfg, tmp_path):
    from ipsweep.lm import collator
    from ipsweep.train import ReplyLossTrainer, _args

    before = torch.are_deterministic_algorithms_enabled()
    try:
        cfg = make_cfg("train.deterministic=true")
        model, tok = models.tiny_random("tiny")
        ReplyLossTrainer(model=model, args=_args(cfg.train, tmp_path, 1), data_collator=collator(tok))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.heavy
def test_a_slurm_sweep_planned_on_a_login_node_pins_the_device_its_jobs_get(tmp_path):
    """The login node has no GPU, the jobs will: with GPUs requested, `model.device=auto` is pinned to cuda
    for every job, so the pre-flight's signatures (with the device kind) are the ones the jobs compute."""
    gpu = launch(
        "-m", *TINY, "prompt=none,caps_strong", "hydra/launcher=slurm", "--dry-run", sweep_dir=tmp_path / "a"
    )
    assert gpu.stdout.count("model.device=cuda") == 2 and "device: cuda" in gpu.stdout
    cpu = launch(
        "-m",
        *TINY,
        "prompt=none",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=0",
        "--dry-run",
        sweep_dir=tmp_path / "b",
    )
    assert "model.device=cpu" in cpu.stdout
    mine = launch(
        "-m",
        *TINY,
        "prompt=none",
        "hydra/launcher=slurm",
        "model.device=cpu",
        "--dry-run",
        sweep_dir=tmp_path / "c",
    )
    assert "model.device=cuda" not in mine.stdout
    names = {json.dumps(sorted(re.findall(r"trait_pair-\w+-s0-[0-9a-f]{12}", p.stdout))) for p in (gpu, cpu)}
    assert len(names) == 2, "a cuda plan and a cpu plan must name different runs"


def test_a_point_that_reuses_a_run_evaluates_its_saved_adapters_on_the_model_it_loaded(make_cfg, monkeypatch):
    """A PTST point on a control run trained earlier: its epoch-1 adapter goes onto the base model the job
    loaded (no second copy, which on a GPU would need twice the weights' memory), comes off again, and the
    job trains on from the model as loaded: the same evaluations, losses and weights as a run that trained
    and evaluated both epochs in one go."""
    from conftest import assert_same_training

    from ipsweep import job

    job.run(make_cfg("train.epochs=1"))
    loads = []
    load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loads.append(1) or load(*a, **k))
    cfg = make_cfg("prompt=safety", "train.epochs=2")
    job.run(cfg)
    assert len(loads) == 1, "the base model is loaded once"
    (record,) = store.records(cfg.store_dir)
    assert {"none", "safety"} <= set(record["epochs"]["1"]["evals"])
    reference = make_cfg("prompt=safety", "train.epochs=2", f"store_dir={cfg.store_dir}_reference")
    job.run(reference)
    assert_same_training(record, store.records(reference.store_dir)[0])
