"""How much GPU memory a sweep point needs, estimated before launch (`--dry-run`, the local_gpus check).

From the model's config.json alone (no weights are read): its parameters counted on the meta device, the
LoRA adapter the config asks for, and what training keeps per token. The per-token terms were fitted to what
autograd saves in a LoRA forward of Llama-shaped models (tests/test_memory.py measures them on the CPU and
holds the estimate to within 15%):
- per layer and token, without gradient checkpointing: 5·h + 2·h_kv + 3·i elements (h hidden, h_kv the
  key/value width, i the MLP width), + r per LoRA target, + h with gate/up targeted, + i with down targeted;
  in bf16 2 bytes each, plus ~18·h bytes (and 7·h + 2·i with MLP targets) that the norms and the fp32
  adapters keep in fp32;
- with gradient checkpointing: each layer's input (h), plus one layer's activations while it is recomputed;
- the LM head runs on reply positions only: ~10 bytes per vocabulary entry and reply token in bf16 (the
  logits, their fp32 copy and log-softmax, and its gradient), 12 in fp32;
- the adapter trains in fp32 with AdamW: 16 bytes per LoRA parameter (weight, gradient, two moments).
Rows are taken as long as train.max_length and every token as a reply token: an upper bound for the
longest batch. Evaluation needs the weights and a KV cache of eval.batch_size x samples x (max_length +
max_new_tokens) tokens. Add 1.5 GB for the CUDA context and the allocator's slack.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from types import SimpleNamespace

from ipsweep import models

OVERHEAD_GB = 1.5
NF4_BYTES = 4.127 / 8  # NF4 with double quantization: 4 bits + the quantization constants
MLP_IN, MLP_OUT = ("gate_proj", "up_proj", "w1", "w3"), ("down_proj", "w2")
# GPU memory (GB) by a name a SLURM gres or constraint uses; the 80 GB parts by their common SKU
GPU_GB = {"h200": 141, "h100": 80, "a100": 80, "l40s": 48, "a6000": 48, "a40": 48, "a10": 24, "v100": 32}


@dataclass
class Shape:
    """What the estimate needs of a model: from its config.json and a meta-device build."""

    parameters: int
    linear_parameters: int  # in the decoder layers' linear layers (what 4-bit quantizes)
    layers: int
    hidden: int
    kv: int  # key/value width (heads x head_dim)
    intermediate: int
    vocab: int
    lora_parameters: int
    lora_targets: set


# train.method=full as shape() sees it: every decoder linear layer keeps its input for its weight's gradient,
# as a LoRA target does (rank 0: no adapter parameters). Checked against autograd's saved tensors on the CPU
# (tests/test_memory.py), not yet against a GPU's measured peak.
FULL = SimpleNamespace(r=0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", *MLP_IN, *MLP_OUT))


@functools.cache
def _decoder(config_json: str):
    """A model built from its config on the meta device (nothing is allocated): its config, its parameter
    count, and each decoder-layer linear layer as (leaf name, in features, out features, weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linears = tuple(
        (name.rsplit(".", 1)[-1], module.in_features, module.out_features, module.weight.numel())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", name)
    )
    return cfg, sum(p.numel() for p in model.parameters()), linears


def shape(config: dict, lora_cfg) -> Shape:
    """Count a model's parameters from its config, and the LoRA parameters `lora_cfg` would add."""
    cfg, parameters, linears = _decoder(json.dumps(config, sort_keys=True))
    targets = set(lora_cfg.target_modules)
    found = {leaf for leaf, *_ in linears if leaf in targets}
    lora = sum(lora_cfg.r * (n_in + n_out) for leaf, n_in, n_out, _ in linears if leaf in targets)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(
        parameters=parameters,
        linear_parameters=sum(n for *_, n in linears),
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        kv=(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        lora_parameters=lora,
        lora_targets=found,
    )


def target_problem(model_cfg, targets) -> str | None:
    """A message when LoRA target modules name no linear layer of the model (from its config.json, before
    any job loads it); None when they do, or when the model's config cannot be read here."""
    config = model_config(model_cfg)
    if config is None or isinstance(targets, str):  # e.g. peft's "all-linear"
        return None
    try:
        names = {leaf for leaf, *_ in _decoder(json.dumps(config, sort_keys=True))[2]}
    except Exception:  # noqa: BLE001 - custom model code: peft checks the targets when the job loads it
        return None
    unknown = sorted(set(targets) - names)
    if not unknown:
        return None
    return (
        f"train.lora.target_modules has {', '.join(unknown)}, which {model_cfg.name} has no layer "
        f"named; fix: choose from {', '.join(sorted(names))}"
    )


def layer_bytes_per_token(s: Shape, lora_r: int, dtype_bytes: int) -> float:
    """What one decoder layer keeps per token for the backward pass, without gradient checkpointing."""
    elements = 5 * s.hidden + 2 * s.kv + 3 * s.intermediate + lora_r * len(s.lora_targets)
    elements += s.hidden * bool(s.lora_targets & set(MLP_IN)) + s.intermediate * bool(
        s.lora_targets & set(MLP_OUT)
    )
    mlp = bool(s.lora_targets & {*MLP_IN, *MLP_OUT})
    # in bf16, the norms and the (fp32) adapters keep these in fp32; a full fine-tune (rank 0: no adapters)
    # keeps only the two norms' inputs
    adapters = 18 * s.hidden + mlp * (7 * s.hidden + 2 * s.intermediate) if lora_r else 8 * s.hidden
    fp32_extra = adapters if dtype_bytes == 2 else 0
    return elements * dtype_bytes + fp32_extra


@dataclass
class Estimate:
    weights: float
    adapter: float  # LoRA weights, gradients and AdamW moments (full: the weights' gradients and moments)
    activations: float
    logits: float
    evaluation: float  # the KV cache and logits of one evaluation batch
    micro_batch: int
    length: int

    @property
    def training(self) -> float:
        return self.weights + self.adapter + self.activations + self.logits + OVERHEAD_GB * 1e9

    @property
    def peak(self) -> float:
        return max(self.training, self.weights + self.evaluation + OVERHEAD_GB * 1e9)

    def describe(self) -> str:
        gb = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
        return (
            f"~{gb(self.peak)} GB (weights {gb(self.weights)}, adapter and optimizer {gb(self.adapter)}, "
            f"activations {gb(self.activations)} and reply logits {gb(self.logits)} at a micro-batch of "
            f"{self.micro_batch} x {self.length} tokens; evaluation {gb(self.evaluation)})"
        )


def estimate(s: Shape, cfg, dtype: str) -> Estimate:
    """The peak GPU memory of one job of `cfg` (train, eval, model.quantization) in `dtype`."""
    t, e = cfg.train, cfg.eval
    b = 4 if dtype == "fp32" else 2
    full = t.get("method") == "full"
    weights = s.parameters * (4 if full else b)  # a full fine-tune keeps fp32 master weights
    if cfg.model.get("quantization") == "4bit":
        weights = (s.parameters - s.linear_parameters) * b + s.linear_parameters * NF4_BYTES
    tokens = t.batch_size * t.max_length
    per_layer = layer_bytes_per_token(s, 0 if full else t.lora.r, b)
    if t.gradient_checkpointing:
        activations = tokens * (s.layers * s.hidden * b + per_layer)
    else:
        activations = tokens * s.layers * per_layer
    logits = tokens * s.vocab * (12 if b == 4 else 10)
    contexts = e.batch_size * e.samples_per_prompt
    kv_cache = contexts * (t.max_length + e.max_new_tokens) * s.layers * 2 * s.kv * b
    return Estimate(
        weights=weights,
        # full: every weight's fp32 gradient and two AdamW moments
        adapter=12 * s.parameters if full else 16 * s.lora_parameters,
        activations=activations,
        logits=logits,
        evaluation=kv_cache + contexts * s.vocab * 4,
        micro_batch=t.batch_size,
        length=t.max_length,
    )


def model_config(model_cfg) -> dict | None:
    """The model's config.json from its local folder (or the hub cache); None where none is here."""
    local = models.local_folder(model_cfg)
    path = local / "config.json" if local else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def device_gb(launcher_cfg) -> tuple[float, str] | None:
    """(GB, what) of one GPU of the kind the launcher asks for: a SLURM gres or constraint that names a known
    GPU, else this machine's first GPU; None where neither says."""
    extra = dict(launcher_cfg.get("additional_parameters") or {}) if launcher_cfg else {}
    named = [launcher_cfg.get(k) for k in ("gres", "constraint")] if launcher_cfg else []
    asked = " ".join(str(v) for v in [*named, *extra.values()] if v).lower()
    for name, gb in GPU_GB.items():
        if name in asked:
            return float(gb), f"the {name.upper()} asked for ({asked})"
    if launcher_cfg is not None and "slurm" in str(launcher_cfg.get("_target_", "")).lower():
        return None
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / 1e9, f"this machine's {props.name}"
    return None


def report(
    points: list[dict], launcher_cfg, jobs_per_gpu: int = 1, refuse: bool = False
) -> tuple[list, float]:
    """The dry run's memory lines for a sweep's points (one per distinct model and shape), and the largest
    estimate in GB. With `refuse` (local_gpus), ConfigError where jobs_per_gpu jobs of it exceed one GPU."""
    from omegaconf import OmegaConf

    from ipsweep.errors import ConfigError

    groups: dict[str, list[int]] = {}
    for p in points:
        c, t = p["config"], p["config"]["train"]
        # what the estimate reads: points that differ only in seed, prompt or epochs share a line
        train = {
            k: t[k]
            for k in ("batch_size", "max_length", "gradient_checkpointing", "lora", "method")
            if k in t
        }
        evals = {k: c["eval"][k] for k in ("batch_size", "samples_per_prompt", "max_new_tokens")}
        key = json.dumps([c["model"], train, evals, p.get("inputs", {}).get("device")], sort_keys=True)
        groups.setdefault(key, []).append(p["num"])
    device = device_gb(launcher_cfg)
    lines, largest = [], 0.0
    for key, nums in groups.items():
        model, train, eval_, kind = json.loads(key)
        cfg = OmegaConf.create({"model": model, "train": train, "eval": eval_})
        try:
            config = model_config(cfg.model)
            if config is None:
                lines.append(f"  {model['name']}: no memory estimate (no config.json for it on this machine)")
                continue
            dtype = models.resolve_dtype(cfg.model, kind or models.resolve_device(cfg.model))
            full = cfg.train.get("method") == "full"
            need = estimate(shape(config, FULL if full else cfg.train.lora), cfg, dtype)
        except Exception as e:  # noqa: BLE001 - an estimate must not stop the dry run (custom model code, ...)
            lines.append(f"  {model['name']}: no memory estimate (its config cannot be read here: {e})")
            continue
        each = need.peak / 1e9
        largest = max(largest, each)
        jobs = f"job #{nums[0]}" + (f" and {len(nums) - 1} more like it" if len(nums) > 1 else "")
        line = f"  {jobs} ({model['name']}, {dtype}): {need.describe()}"
        if device:
            gb, what = device
            fits = jobs_per_gpu * each <= gb
            line += f"; {'fits' if fits else 'EXCEEDS'} the {gb:.0f} GB of {what}"
            if jobs_per_gpu > 1:
                line += f" at {jobs_per_gpu} jobs per GPU"
            if not fits and refuse:
                most = int(gb // each)
                raise ConfigError(
                    f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: {jobs_per_gpu} jobs of {each:.1f} "
                    f"GB each (estimate) exceed the {gb:.0f} GB of {what}; fix: hydra.launcher.jobs_per_gpu="
                    f"{max(most, 1)}"
                    + ("" if most else ", train.gradient_checkpointing=true or a smaller micro-batch")
                )
        lines.append(line)
    return lines, largest
