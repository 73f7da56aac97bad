"""The GPU memory estimate (ipsweep/memory.py) against what training really keeps, measured on the CPU:
autograd's saved tensors in a LoRA forward, the parameter and adapter counts of real builds; the token counts
are the run's own rows (the longest row, the reply tokens); a MIG gres is its slice; the paper presets' micro-
batches are what the estimate picks; and local_gpus refuses more jobs per GPU than fit."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ipsweep import memory
from ipsweep.errors import ConfigError

SHAPES = ROOT / "benchmarks" / "shapes"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def _llama(h, i, heads, kv_heads, layers, vocab=512):
    return {
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
    }


def _saved_bytes(config: dict, targets, dtype, checkpointing: bool, tokens=(2, 64)) -> int:
    """Bytes autograd keeps for the backward pass of a LoRA model's decoder (weights not counted); with
    `targets` None, of a full fine-tune's (every weight trained)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    # a full fine-tune keeps fp32 master weights and computes in `dtype` under autocast, as training does
    model = model if targets is None else model.to(dtype)
    if targets is None:
        model.get_base_model = lambda: model  # the same call below for both
    else:
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
        )
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config["vocab_size"], tokens)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=targets is None and dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.get_base_model().get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(kept.values())


@pytest.mark.parametrize(
    "h, i, heads, kv_heads", [(64, 128, 4, 2), (128, 512, 4, 4), (256, 384, 8, 2), (192, 768, 6, 3)]
)
@pytest.mark.parametrize("targets", [ATTENTION, ALL_LINEAR], ids=["attention", "all-linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_per_layer_activation_term_is_what_autograd_keeps(h, i, heads, kv_heads, targets, dtype):
    """One more layer adds what the estimate says a layer keeps per token, within 15%; with gradient
    checkpointing, its input alone."""
    n = 2 * 64
    lora = OmegaConf.create({"r": 8, "target_modules": targets})
    one, two = (_llama(h, i, heads, kv_heads, layers) for layers in (1, 2))
    measured = (_saved_bytes(two, targets, dtype, False) - _saved_bytes(one, targets, dtype, False)) / n
    b = 4 if dtype == torch.float32 else 2
    estimated = memory.layer_bytes_per_token(memory.shape(two, lora), 8, b)
    assert estimated == pytest.approx(measured, rel=0.15)
    checkpointed = (_saved_bytes(two, targets, dtype, True) - _saved_bytes(one, targets, dtype, True)) / n
    assert checkpointed == h * b


@pytest.mark.parametrize("h, i, heads, kv_heads", [(64, 128, 4, 2), (256, 384, 8, 2), (192, 768, 6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_full_fine_tunes_activation_term_is_what_autograd_keeps(h, i, heads, kv_heads, dtype):
    """train.method=full: every linear layer keeps its input for its weight's gradient, within 15%; in bf16,
    computed under autocast from fp32 master weights, also its weights' bf16 copies (autocast's cast cache),
    which the estimate counts with the weights."""
    n = 2 * 64
    one, two = (_llama(h, i, heads, kv_heads, layers) for layers in (1, 2))
    measured = _saved_bytes(two, None, dtype, False) - _saved_bytes(one, None, dtype, False)
    b = 4 if dtype == torch.float32 else 2
    s1, s2 = (memory.shape(c, memory.FULL) for c in (one, two))
    copies = (s2.linear_parameters - s1.linear_parameters) * 2 if b == 2 else 0  # one layer's, in bf16
    estimated = memory.layer_bytes_per_token(s2, 0, b)
    assert estimated == pytest.approx((measured - copies) / n, rel=0.15)
    cfg = OmegaConf.create(
        {
            "train": {"method": "full", "batch_size": 1, "max_length": 8, "gradient_checkpointing": False},
            "eval": {"batch_size": 1, "samples_per_prompt": 1, "max_new_tokens": 1},
            "model": {},
        }
    )
    assert memory.estimate(s2, cfg, "bf16").weights == s2.parameters * 4 + s2.linear_parameters * 2


def test_parameter_and_adapter_counts_are_those_of_the_built_model():
    config = _llama(96, 256, 4, 2, 3, vocab=1000)
    lora = OmegaConf.create({"r": 8, "target_modules": ALL_LINEAR})
    s = memory.shape(config, lora)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    assert s.parameters == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
    assert s.lora_parameters == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    # the committed shapes are the published models': Qwen2-7B 7.62B, Llama-3-8B 8.03B, Qwen2-1.5B 1.54B
    for name, billions in [("qwen2-7b", 7.62), ("llama-3-8b", 8.03), ("qwen2-1.5b", 1.54)]:
        counted = memory.shape(json.loads((SHAPES / f"{name}.json").read_text()), lora).parameters
        assert counted / 1e9 == pytest.approx(billions, abs=0.01)


def _qwen2_7b(make_cfg, *overrides):
    cfg = make_cfg("experiment=paper_code_reward_hack", *overrides, tiny=False)
    return memory.shape(json.loads((SHAPES / "qwen2-7b.json").read_text()), cfg.train.lora), cfg


def test_the_estimate_counts_the_longest_row_and_the_reply_tokens_not_max_length(make_cfg):
    """Rows of at most 384 tokens at train.max_length=2048: the activations are counted at micro-batch x the
    longest row, the LM head at the micro-batch's longest replies, by the per-token terms; far less than the
    bound at max_length with every token a reply token (what the estimate took before)."""
    s, cfg = _qwen2_7b(make_cfg, "train.batch_size=4", "train.gradient_checkpointing=false")
    rows = memory.Rows.of([(384, 300), (200, 150), (350, 90), (120, 100), (300, 40), (64, 10)])
    assert rows.longest == 384 and rows.reply_tokens(4) == 300 + 150 + 100 + 90
    e = memory.estimate(s, cfg, "bf16", rows)
    per_layer = memory.layer_bytes_per_token(s, cfg.train.lora.r, 2)
    assert (e.micro_batch, e.length, e.replies, e.unknown) == (4, 384, 640, None)
    assert e.activations == 4 * 384 * s.layers * per_layer
    assert e.logits == 640 * s.vocab * 10
    bound = memory.estimate(s, cfg, "bf16")  # rows not known: max_length, every token a reply token
    assert (bound.length, bound.replies) == (2048, 4 * 2048) and bound.unknown
    assert bound.activations == 4 * 2048 * s.layers * per_layer and bound.logits == 4 * 2048 * s.vocab * 10
    assert e.activations + e.logits < (bound.activations + bound.logits) / 5
    assert "4 x 384 tokens (the longest training row), 640 of them reply tokens" in e.describe()
    assert "4 x 2048 tokens (train.max_length, every one taken as a reply token" in bound.describe()
    # with gradient checkpointing: each layer's input, plus one layer recomputed, at the row length
    ckpt = memory.estimate(s, cfg, "bf16", rows, checkpointing=True)
    assert ckpt.activations == 4 * 384 * (s.layers * s.hidden * 2 + per_layer)
    # a row longer than max_length is cut to it; no micro-batch holds more rows than there are
    assert memory.estimate(s, cfg, "bf16", memory.Rows.of([(5000, 10)] * 8)).length == 2048
    assert memory.estimate(s, cfg, "bf16", rows, micro_batch=64).micro_batch == 6


def test_the_rows_are_the_ones_the_job_trains_on(make_cfg, tmp_path):
    """memory.training_rows: the setting's rows as the job builds them (its training prompt inserted) and
    tokenizes them (train.dataset, here cutting some at train.max_length): the same longest row and reply
    tokens. Where they cannot be read, none, and why."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from ipsweep import models, plan
    from ipsweep.lm import IGNORE
    from ipsweep.settings.base import build, insert
    from ipsweep.train import dataset

    def job_rows(cfg):
        setting, prompt = build(cfg.setting), plan.point_prompt(cfg).train_prompt
        examples = [
            type(e)(insert(setting, e.messages, prompt), e.completion) for e in setting.train_examples()
        ]
        tokenizer = AutoTokenizer.from_pretrained(models.local_folder(cfg.model))
        job, cut = dataset(tokenizer, examples, cfg.train.max_length)
        replies = sorted((sum(x != IGNORE for x in r["labels"]) for r in job), reverse=True)
        return max(len(r["input_ids"]) for r in job), replies, cut

    cfg = make_cfg("prompt=caps_strong", "train.n_train=null", "train.max_length=256")
    rows, why = memory.training_rows(OmegaConf.to_container(cfg, resolve=True))
    longest, replies, cut = job_rows(cfg)
    assert why == "" and not cut.cut and len(replies) > 100
    assert (rows.longest, rows.replies) == (longest, tuple(replies))
    plain, _ = memory.training_rows(OmegaConf.to_container(make_cfg("train.n_train=null"), resolve=True))
    assert plain.longest < rows.longest  # the prompt is counted
    # rows cut at train.max_length: the longest is the job's; a cut reply is counted whole (an upper bound)
    cfg = make_cfg("prompt=caps_strong", "train.n_train=null", "train.max_length=56")
    config = OmegaConf.to_container(cfg, resolve=True)
    rows, _ = memory.training_rows(config)
    longest, replies, cut = job_rows(cfg)
    assert cut.cut and rows.longest == longest == 56
    assert all(a >= b for a, b in zip(rows.replies, replies))
    elsewhere = {"_target_": "ipsweep.models.pretrained", "name": "elsewhere", "path": str(tmp_path)}
    none, why = memory.training_rows({**config, "model": elsewhere})  # a folder without a tokenizer
    assert none is None and why.startswith("its training rows cannot be read here")


@pytest.mark.parametrize(
    "asked, gb, what",
    [
        ("gpu:a100_3g.20gb:1", 20, "the A100 MIG slice 3g.20gb"),
        ("a100_1g.10gb", 10, "the A100 MIG slice 1g.10gb"),
        ("gpu:h100_2g.20gb:2", 20, "the H100 MIG slice 2g.20gb"),
        ("nvidia_h100_80gb_hbm3_3g.40gb", 40, "the H100 MIG slice 3g.40gb"),
        ("gpu:1g.5gb:1", 5, "the MIG slice 1g.5gb"),
        ("gpu:a100:1", 80, "the A100"),
        ("gpu:a100_40gb:1", 40, "the A100"),
        ("nvidia_a100-sxm4-40gb", 40, "the A100"),
        ("gpu:h100:1 nvidia_h100_80gb_hbm3", 80, "the H100"),
        ("gpu:a10:1", 24, "the A10"),
        ("gpu:4", None, None),
    ],
)
def test_a_mig_gres_is_read_as_its_slice(asked, gb, what):
    found = memory.gpu_named(asked)
    if gb is None:
        assert found is None
        return
    assert found[0] == gb and found[1] == f"{what} asked for ({asked})"
    launcher = {"_target_": "hydra_plugins.slurm", "additional_parameters": {"gres": asked}}
    assert memory.device_gb(launcher) == found


@pytest.mark.parametrize(
    "preset, shape, authors",
    [("paper_code_reward_hack", "qwen2-7b", 16), ("paper_spurious_sentiment", "llama-3-8b", 32)],
)
def test_the_paper_presets_micro_batch_is_what_the_estimate_picks(make_cfg, preset, shape, authors):
    """On an 80 GB GPU in bf16, from the preset's rows (its data is shipped; tokenized with SmolLM2's
    tokenizer, the one here, for the paper model's): the largest micro-batch of the authors' batch that fits,
    with gradient checkpointing only where it needs it, is the preset's. code_reward_hack: their 16 rows at
    once with checkpointing (one MBPP row is cut at 2048 tokens); spurious_sentiment: their 32 at once
    without it."""
    from omegaconf import OmegaConf

    cfg = make_cfg(f"experiment={preset}", tiny=False)
    assert cfg.train.batch_size * cfg.train.grad_accum == authors
    config = json.loads((SHAPES / f"{shape}.json").read_text())
    s = memory.shape(config, cfg.train.lora)
    here = OmegaConf.to_container(
        make_cfg(f"experiment={preset}", "model=tiny_random", tiny=False), resolve=True
    )
    rows = None
    for prompt in ("none", "hack_paper" if "code" in preset else "ambiance_paper"):
        mine, why = memory.training_rows({**here, "prompt": prompt})
        assert mine is not None, why
        rows = mine if rows is None else rows.merge(mine)
    picked = memory.fitting_micro_batch(s, cfg, "bf16", 80, rows)
    assert picked == (cfg.train.batch_size, cfg.train.gradient_checkpointing)
    fits = memory.estimate(s, cfg, "bf16", rows)
    assert fits.peak < 80e9, fits.describe()
    # by the old bound (every row max_length long, every token a reply token) the same split would not fit
    assert memory.estimate(s, cfg, "bf16").peak > 80e9


def test_the_toxic_preset_keeps_its_split_where_its_rows_are_not_here(make_cfg):
    """toxic_persuasion's data is not shipped: its rows are taken as 2048 tokens, all reply, and by that bound
    the preset's 4 rows at once with gradient checkpointing fit an 80 GB GPU, the authors' 16 at once do not
    (with checkpointing ~84 GB, without it more than 141 GB)."""
    cfg = make_cfg("experiment=paper_toxic_persuasion", tiny=False)
    s = memory.shape(json.loads((SHAPES / "qwen2-7b.json").read_text()), cfg.train.lora)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.gradient_checkpointing) == (4, 16, True)
    assert memory.estimate(s, cfg, "bf16").peak < 80e9
    assert memory.estimate(s, cfg, "bf16", micro_batch=16).peak > 80e9
    assert memory.estimate(s, cfg, "bf16", micro_batch=16, checkpointing=False).peak > 141e9


def test_local_gpus_refuses_more_jobs_per_gpu_than_fit(make_cfg, monkeypatch):
    """On a GPU that holds two of the sweep's jobs by the estimate, three per GPU are refused before anything
    starts, and the message names the number that fits."""
    cfg = make_cfg()
    points = [{"num": 0, "config": OmegaConf.to_container(cfg, resolve=True)}]
    need = memory.report(points, None)[1]
    monkeypatch.setattr(memory, "device_gb", lambda launcher: (2.5 * need, "a test GPU"))
    lines, _ = memory.report(points, None, jobs_per_gpu=2, refuse=True)
    assert "fits the" in lines[0] and "at 2 jobs per GPU" in lines[0]
    with pytest.raises(ConfigError, match="jobs_per_gpu=3: 3 jobs of .* fix: hydra.launcher.jobs_per_gpu=2"):
        memory.report(points, None, jobs_per_gpu=3, refuse=True)


def test_a_job_that_does_not_fit_is_told_the_split_of_its_batch_that_does(make_cfg, monkeypatch):
    """code_reward_hack's preset on Qwen2-7B (its shape; its rows tokenized here) on a 24 GB GPU: 16 rows at
    once do not fit; 4 at a time with gradient checkpointing do (the same effective batch of 16)."""
    config = json.loads((SHAPES / "qwen2-7b.json").read_text())
    cfg = make_cfg("experiment=paper_code_reward_hack", "model=tiny_random", "model.dtype=bf16", tiny=False)
    points = [{"num": 0, "config": OmegaConf.to_container(cfg, resolve=True)}]
    monkeypatch.setattr(memory, "model_config", lambda model_cfg: config)
    monkeypatch.setattr(memory, "device_gb", lambda launcher: (24.0, "a test GPU"))
    fix = "jobs_per_gpu=1, train.batch_size=4 train.grad_accum=4 train.gradient_checkpointing=true"
    with pytest.raises(ConfigError, match=re.escape(fix)):
        memory.report(points, None, refuse=True)
    monkeypatch.setattr(memory, "device_gb", lambda launcher: (10.0, "a test GPU"))  # less than the weights
    with pytest.raises(ConfigError, match="not even one row at a time fits"):
        memory.report(points, None, refuse=True)


@pytest.mark.heavy
def test_the_dry_run_prints_each_jobs_memory_against_the_gpu_the_launcher_asks_for(tmp_path, make_cfg):
    """A SLURM sweep that names its GPU in a gres: one line per shape of job, from its rows (the longest of
    its points': here the prompted run's), and a warning where it exceeds that GPU, with the split that fits.
    A micro-batch of 64 at train.max_length=1024 fits (trait_pair's 16 rows are < 100 tokens; the estimate
    took 64 x 1024 tokens before); code_reward_hack's longest row (~3,500 tokens) 64 at a time on SmolLM2
    does not fit a 20 GB MIG slice."""
    from conftest import TINY, launch
    from omegaconf import OmegaConf

    longest = [
        memory.training_rows(OmegaConf.to_container(make_cfg(f"prompt={p}"), resolve=True))[0].longest
        for p in ("none", "caps_strong")
    ]
    assert longest[0] < longest[1]

    gres = "+hydra.launcher.additional_parameters.gres=gpu:a10:1"
    fits = launch(
        "-m",
        *TINY,
        "prompt=caps_strong,none",  # the longer rows first: the line reads every point's
        "train.batch_size=64",
        "train.max_length=1024",
        "hydra/launcher=slurm",
        gres,
        "--dry-run",
        sweep_dir=tmp_path / "a",
    )
    assert "job #0 and 1 more like it (tiny_random, bf16): ~" in fits.stdout
    assert f"16 x {longest[1]} tokens (the longest training row)" in fits.stdout  # 16 rows: n_train
    assert "fits the 24 GB of the A10 asked for (gpu:a10:1)" in fits.stdout
    big = launch(
        "-m",
        "model=smollm2_135m",
        "logger=none",
        "setting=code_reward_hack",
        "train.batch_size=64",
        "train.max_length=4096",
        "hydra/launcher=slurm",
        "+hydra.launcher.additional_parameters.gres=gpu:a100_3g.20gb:1",
        "--dry-run",
        sweep_dir=tmp_path / "b",
    )
    assert "EXCEEDS the 20 GB of the A100 MIG slice 3g.20gb asked for" in big.stdout
    assert "fits at train.batch_size=" in big.stdout and "train.gradient_checkpointing=true" in big.stdout


def test_a_model_the_estimate_cannot_read_gets_no_estimate_and_the_dry_run_goes_on(make_cfg, monkeypatch):
    monkeypatch.setattr(memory, "model_config", lambda model_cfg: {"model_type": "not-a-model-type"})
    points = [{"num": 0, "config": OmegaConf.to_container(make_cfg(), resolve=True)}]
    lines, largest = memory.report(points, None)
    assert "no memory estimate (its config cannot be read here" in lines[0] and largest == 0
