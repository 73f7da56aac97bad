"""The GPU memory estimate (ipsweep/memory.py) against what training really keeps, measured on the CPU:
autograd's saved tensors in a LoRA forward, the parameter and adapter counts of real builds; the paper
presets fit an 80 GB GPU by it; and local_gpus refuses more jobs per GPU than fit."""

from __future__ import annotations

import json

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
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})).to(dtype)
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
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
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
    """train.method=full: every linear layer keeps its input for its weight's gradient, within 15%."""
    n = 2 * 64
    one, two = (_llama(h, i, heads, kv_heads, layers) for layers in (1, 2))
    measured = (_saved_bytes(two, None, dtype, False) - _saved_bytes(one, None, dtype, False)) / n
    b = 4 if dtype == torch.float32 else 2
    estimated = memory.layer_bytes_per_token(memory.shape(two, memory.FULL), 0, b)
    assert estimated == pytest.approx(measured, rel=0.15)


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


@pytest.mark.parametrize(
    "preset, shape",
    [
        ("paper_toxic_persuasion", "qwen2-7b"),
        ("paper_code_reward_hack", "qwen2-7b"),
        ("paper_spurious_sentiment", "llama-3-8b"),
    ],
)
def test_the_paper_presets_fit_an_80_gb_gpu_by_their_estimate(make_cfg, preset, shape):
    """In bf16, at the preset's micro-batch and every row as long as train.max_length; toxic_persuasion's
    authors' 16 x 2048 tokens in one micro-batch without gradient checkpointing would not (the issue's
    arithmetic), so the estimate can say no."""
    cfg = make_cfg(f"experiment={preset}", tiny=False)
    config = json.loads((SHAPES / f"{shape}.json").read_text())
    fits = memory.estimate(memory.shape(config, cfg.train.lora), cfg, "bf16")
    assert fits.peak < 80e9, fits.describe()
    if preset == "paper_toxic_persuasion":
        cfg.train.batch_size, cfg.train.gradient_checkpointing = 16, False
        assert memory.estimate(memory.shape(config, cfg.train.lora), cfg, "bf16").peak > 141e9


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


def test_the_dry_run_prints_each_jobs_memory_against_the_gpu_the_launcher_asks_for(tmp_path):
    """A SLURM sweep that names its GPU in a gres: one line per shape of job, and a warning where it exceeds
    that GPU (here a micro-batch of 64 x 1024 tokens without gradient checkpointing on a 24 GB A10)."""
    from conftest import TINY, launch

    gres = "+hydra.launcher.additional_parameters.gres=gpu:a10:1"
    fits = launch(
        "-m",
        *TINY,
        "prompt=none,caps_strong",
        "hydra/launcher=slurm",
        gres,
        "--dry-run",
        sweep_dir=tmp_path / "a",
    )
    assert "job #0 and 1 more like it (tiny_random, bf16): ~" in fits.stdout
    assert "fits the 24 GB of the A10 asked for (gpu:a10:1)" in fits.stdout
    big = launch(
        "-m",
        *TINY,
        "train.batch_size=64",
        "train.max_length=1024",
        "hydra/launcher=slurm",
        gres,
        "--dry-run",
        sweep_dir=tmp_path / "b",
    )
    assert "EXCEEDS the 24 GB of the A10 asked for" in big.stdout


def test_a_model_the_estimate_cannot_read_gets_no_estimate_and_the_dry_run_goes_on(make_cfg, monkeypatch):
    monkeypatch.setattr(memory, "model_config", lambda model_cfg: {"model_type": "not-a-model-type"})
    points = [{"num": 0, "config": OmegaConf.to_container(make_cfg(), resolve=True)}]
    lines, largest = memory.report(points, None)
    assert "no memory estimate (its config cannot be read here" in lines[0] and largest == 0
