"""How much GPU memory a sweep point needs, estimated before launch (`--dry-run`, the local_gpus check).

From the model's config.json (no weights are read) and its tokenizer: its parameters counted on the meta
device, the LoRA adapter the config asks for, and what training keeps per token of the run's rows. The
per-token terms were fitted to what autograd saves in a LoRA forward of Llama-shaped models
(tests/test_memory.py measures them on the CPU and holds the estimate to within 15%):
- per layer and token, without gradient checkpointing: 5·h + 2·h_kv + 3·i elements (h hidden, h_kv the
  key/value width, i the MLP width), + r per LoRA target, + h with gate/up targeted, + i with down targeted;
  in bf16 2 bytes each, plus ~18·h bytes (and 7·h + 2·i with MLP targets) that the norms and the fp32
  adapters keep in fp32;
- with gradient checkpointing: each layer's input (h), plus one layer's activations while it is recomputed;
- the LM head runs on reply positions only: ~10 bytes per vocabulary entry and reply token in bf16 (the
  logits, their fp32 copy and log-softmax, and its gradient), 12 in fp32;
- the adapter trains in fp32 with AdamW: 16 bytes per LoRA parameter (weight, gradient, two moments);
- a full fine-tune (train.method=full): 16 bytes per parameter, and in bf16 (autocast from the fp32 master
  weights) a bf16 copy of each linear weight (autocast's cast cache) and ~18·h bytes per layer and token in
  fp32 (the residual stream stays fp32), measured the same way.
The token counts come from the run's own training rows, tokenized as the job tokenizes them (the rows the
dry run's cost rule reads, ipsweep/cost.py, with the run's training prompt inserted; its longest training
text where the prompt is mixed): a batch is padded to its longest row, so the activations are counted at
micro-batch x the longest row's tokens (as train.max_length leaves it), and the LM head at the most reply
(labelled) tokens one micro-batch can hold, its rows' longest replies (a reply that the inserted prompt
pushes past train.max_length is counted whole: an upper bound). Where the rows cannot be known here
(no local tokenizer for the model, a setting whose data is not here), every row is taken as long as
train.max_length and every token as a reply token, an upper bound, and the estimate says so. Evaluation
needs the weights and a KV cache of eval.batch_size x samples x (max_length + max_new_tokens) tokens. Add
1.5 GB for the CUDA context and the allocator's slack.

The GPU is the one a SLURM gres or constraint names (a MIG profile, `a100_3g.20gb`, as its slice's memory;
a size in the name, `a100_40gb`, as that size) or this machine's first GPU.
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
# a MIG profile (<compute slices>g.<memory>gb: a100_3g.20gb, 1g.10gb, nvidia_h100_80gb_hbm3_3g.40gb): a slice
# of that much memory, not the whole card
MIG = re.compile(r"(\d+)g\.(\d+)gb")
SIZED = re.compile(r"(\d+)gb")  # a card's size in its name: a100_40gb, nvidia_a100-sxm4-40gb


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
    # computes from fp32 master weights under autocast, so its residual stream stays fp32: the two norms keep
    # their fp32 inputs and outputs (measured 18.2-18.4·h bytes per token on 4 shapes; tests/test_memory.py
    # checks 3)
    adapters = 18 * s.hidden + mlp * (7 * s.hidden + 2 * s.intermediate) if lora_r else 18 * s.hidden
    fp32_extra = adapters if dtype_bytes == 2 else 0
    return elements * dtype_bytes + fp32_extra


@dataclass(frozen=True)
class Rows:
    """What the estimate reads of a run's training rows, tokenized as its job tokenizes them."""

    # tokens of the longest row as train.max_length leaves it: a batch is padded to its longest row
    longest: int
    replies: tuple[int, ...]  # each row's reply (labelled) tokens, most first

    @classmethod
    def of(cls, counts) -> Rows:
        """From each row's (tokens, reply tokens), e.g. cost.training_rows."""
        return cls(max(t for t, _ in counts), tuple(sorted((r for _, r in counts), reverse=True)))

    def reply_tokens(self, micro_batch: int) -> int:
        """The most reply tokens one micro-batch can hold: the micro_batch longest replies."""
        return sum(self.replies[:micro_batch])

    def merge(self, other: Rows) -> Rows:
        """Rows at least as long as both, reply for reply (points whose jobs share an estimate line)."""
        n = max(len(self.replies), len(other.replies))
        a, b = (r.replies + (0,) * (n - len(r.replies)) for r in (self, other))
        return Rows(max(self.longest, other.longest), tuple(map(max, a, b)))


@dataclass
class Estimate:
    weights: float
    adapter: float  # LoRA weights, gradients and AdamW moments (full: the weights' gradients and moments)
    activations: float
    logits: float
    evaluation: float  # the KV cache and logits of one evaluation batch
    micro_batch: int
    length: int  # tokens per row of the micro-batch: the longest training row, or train.max_length
    replies: int  # reply tokens of the micro-batch, where the LM head runs
    unknown: str | None = None  # why the rows are not known (length = train.max_length); None where they are

    @property
    def training(self) -> float:
        return self.weights + self.adapter + self.activations + self.logits + OVERHEAD_GB * 1e9

    @property
    def peak(self) -> float:
        return max(self.training, self.weights + self.evaluation + OVERHEAD_GB * 1e9)

    def describe(self) -> str:
        gb = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
        rows = (
            f"{self.micro_batch} x {self.length} tokens (the longest training row), {self.replies:,} of them "
            "reply tokens"
            if self.unknown is None
            else f"{self.micro_batch} x {self.length} tokens (train.max_length, every one taken as a reply "
            f"token: {self.unknown})"
        )
        return (
            f"~{gb(self.peak)} GB (weights {gb(self.weights)}, adapter and optimizer {gb(self.adapter)}, "
            f"activations {gb(self.activations)} and reply logits {gb(self.logits)} at a micro-batch of "
            f"{rows}; evaluation {gb(self.evaluation)})"
        )


def estimate(
    s: Shape,
    cfg,
    dtype: str,
    rows: Rows | None = None,
    micro_batch: int | None = None,
    checkpointing: bool | None = None,
    unknown: str = "the training rows were not tokenized",
) -> Estimate:
    """The peak GPU memory of one job of `cfg` (train, eval, model.quantization) in `dtype`, from its training
    `rows` (None: every row as long as train.max_length and every token a reply token; `unknown` says why).
    `micro_batch` and `checkpointing` replace train.batch_size and train.gradient_checkpointing."""
    t, e = cfg.train, cfg.eval
    b = 4 if dtype == "fp32" else 2
    full = t.get("method") == "full"
    micro = micro_batch or t.batch_size
    checkpointing = t.gradient_checkpointing if checkpointing is None else checkpointing
    weights = s.parameters * (4 if full else b)  # a full fine-tune keeps fp32 master weights
    if full and b == 2:  # ... and computes under autocast, whose cast cache holds a bf16 copy of each
        weights += s.linear_parameters * 2
    if cfg.model.get("quantization") == "4bit":
        weights = (s.parameters - s.linear_parameters) * b + s.linear_parameters * NF4_BYTES
    length = min(rows.longest, t.max_length) if rows else t.max_length
    if rows:  # no micro-batch holds more rows than there are
        micro = min(micro, len(rows.replies))
    tokens = micro * length
    replies = min(rows.reply_tokens(micro), tokens) if rows else tokens
    per_layer = layer_bytes_per_token(s, 0 if full else t.lora.r, b)
    if checkpointing:
        activations = tokens * (s.layers * s.hidden * b + per_layer)
    else:
        activations = tokens * s.layers * per_layer
    logits = replies * s.vocab * (12 if b == 4 else 10)
    contexts = e.batch_size * e.samples_per_prompt
    kv_cache = contexts * (t.max_length + e.max_new_tokens) * s.layers * 2 * s.kv * b
    return Estimate(
        weights=weights,
        # full: every weight's fp32 gradient and two AdamW moments
        adapter=12 * s.parameters if full else 16 * s.lora_parameters,
        activations=activations,
        logits=logits,
        evaluation=kv_cache + contexts * s.vocab * 4,
        micro_batch=micro,
        length=length,
        replies=replies,
        unknown=None if rows else unknown,
    )


def fitting_micro_batch(s: Shape, cfg, dtype: str, gb: float, rows: Rows | None = None) -> tuple | None:
    """(micro-batch, gradient checkpointing) for a job of `cfg` on `gb` GB by the estimate: the largest
    micro-batch that divides the effective batch (train.batch_size x train.grad_accum, which stays), with
    gradient checkpointing only where that micro-batch does not fit without it; None where one row at a
    time does not fit even with it."""
    effective = cfg.train.batch_size * cfg.train.grad_accum
    for micro in (d for d in range(effective, 0, -1) if effective % d == 0):
        for checkpointing in (False, True):
            if estimate(s, cfg, dtype, rows, micro, checkpointing).peak <= gb * 1e9:
                return micro, checkpointing
    return None


def split(cfg, micro: int, checkpointing: bool) -> str:
    """The overrides that train `cfg`'s effective batch at this micro-batch."""
    effective = cfg.train.batch_size * cfg.train.grad_accum
    return (
        f"train.batch_size={micro} train.grad_accum={effective // micro} "
        f"train.gradient_checkpointing={str(checkpointing).lower()}"
    )


def _rows_key(config: dict) -> list:
    """The part of a point's config its training rows depend on (training_rows reads no more)."""
    t, setting = config["train"], config["setting"]
    flawed = setting.get("flawed_share", 1.0) < 1
    return [
        config["model"],
        setting,
        config["prompt"],
        config.get("prompt_placement"),
        {k: t.get(k) for k in ("n_train", "max_length", "prompt_mode", "paraphrases")},
        t.get("seed") if flawed else None,  # which rows train on a clean reply
    ]


def training_rows(config: dict, n_train: int | None = None) -> tuple[Rows | None, str]:
    """A point's training rows (its config, as the sweep holds it) as its job will tokenize them, its training
    prompt inserted (cost.training_rows); (None, why) where they cannot be known here."""
    from omegaconf import OmegaConf

    from ipsweep import cost, plan

    keys = ("model", "setting", "prompt", "prompt_placement", "train")
    cfg = OmegaConf.create({k: config[k] for k in keys if k in config})  # not the rest: a sweep has many
    try:
        folder = models.local_folder(cfg.model)
        if folder is None:
            return None, "no local copy of the model's tokenizer"
        share = cfg.setting.get("flawed_share", 1.0)
        counts = cost.training_rows(
            folder,
            config["setting"],
            n_train or cfg.train.get("n_train"),
            cfg.train.max_length,
            (share, cfg.train.seed) if share < 1 else None,
            plan.point_prompt(cfg).train_prompt,
        )
    except Exception as e:  # noqa: BLE001 - an estimate must not stop the dry run (data not here, ...)
        why = " ".join(str(e.__cause__ or e).split()).split("; fix:")[0]  # the setting's error, not hydra's
        why = why if len(why) < 160 else why[:157] + "..."
        return None, f"its training rows cannot be read here: {why}"
    if not counts:
        return None, "the setting has no training rows here"
    return Rows.of(counts), ""


def model_config(model_cfg) -> dict | None:
    """The model's config.json from its local folder (or the hub cache); None where none is here."""
    local = models.local_folder(model_cfg)
    path = local / "config.json" if local else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def gpu_named(asked: str) -> tuple[float, str] | None:
    """(GB, what) of the GPU a SLURM gres or constraint names: a MIG profile as its slice
    (`gpu:a100_3g.20gb:1`: 20 GB), a size in the name as that size (`a100_40gb`), else a known GPU by its
    common SKU; None where it names none."""
    asked = asked.lower()
    words = [w for w in re.split(r"[\s,]+", asked) if w]
    for word in words:
        if mig := MIG.search(word):
            card = next((name.upper() + " " for name in GPU_GB if name in word), "")
            slices, gb = mig.groups()
            return float(gb), f"the {card}MIG slice {slices}g.{gb}gb asked for ({asked})"
    for name, gb in GPU_GB.items():
        for word in words:
            if name in word:
                sized = SIZED.search(word[word.index(name) :])
                return float(sized.group(1) if sized else gb), f"the {name.upper()} asked for ({asked})"
    return None


def device_gb(launcher_cfg) -> tuple[float, str] | None:
    """(GB, what) of one GPU of the kind the launcher asks for: a SLURM gres or constraint that names a known
    GPU or a MIG profile (gpu_named), else this machine's first GPU; None where neither says."""
    extra = dict(launcher_cfg.get("additional_parameters") or {}) if launcher_cfg else {}
    named = [launcher_cfg.get(k) for k in ("gres", "constraint")] if launcher_cfg else []
    asked = " ".join(str(v) for v in [*named, *extra.values()] if v)
    if found := gpu_named(asked):
        return found
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
    estimate in GB. Each line's estimate is from its points' training rows (training_rows; the longest of
    them where they differ). With `refuse` (local_gpus), ConfigError where jobs_per_gpu jobs of it exceed
    one GPU."""
    from omegaconf import OmegaConf

    from ipsweep.errors import ConfigError

    groups: dict[str, list[dict]] = {}
    for p in points:
        c, t = p["config"], p["config"]["train"]
        # what the estimate reads: points that differ only in seed, prompt or epochs share a line
        train = {
            k: t[k]
            for k in ("batch_size", "grad_accum", "max_length", "gradient_checkpointing", "lora", "method")
            if k in t
        }
        evals = {k: c["eval"][k] for k in ("batch_size", "samples_per_prompt", "max_new_tokens")}
        key = json.dumps([c["model"], train, evals, p.get("inputs", {}).get("device")], sort_keys=True)
        groups.setdefault(key, []).append(p)
    device = device_gb(launcher_cfg)
    lines, largest, tokenized = [], 0.0, {}
    for key, members in groups.items():
        model, train, eval_, kind = json.loads(key)
        nums = [p["num"] for p in members]
        cfg = OmegaConf.create({"model": model, "train": train, "eval": eval_})
        try:
            config = model_config(cfg.model)
            if config is None:
                lines.append(f"  {model['name']}: no memory estimate (no config.json for it on this machine)")
                continue
            dtype = models.resolve_dtype(cfg.model, kind or models.resolve_device(cfg.model))
            full = cfg.train.get("method") == "full"
            s = shape(config, FULL if full else cfg.train.lora)
        except Exception as e:  # noqa: BLE001 - an estimate must not stop the dry run (custom model code, ...)
            lines.append(f"  {model['name']}: no memory estimate (its config cannot be read here: {e})")
            continue
        rows, unknown = None, ""
        for p in members:  # the rows of every point of the line: one tokenization per setting and prompt
            which = json.dumps(_rows_key(p["config"]) + [p.get("n_train")], sort_keys=True, default=str)
            if which not in tokenized:
                tokenized[which] = training_rows(p["config"], p.get("n_train"))
            mine, why = tokenized[which]
            if mine is None:
                rows, unknown = None, why
                break
            rows = mine if rows is None else rows.merge(mine)
        need = estimate(s, cfg, dtype, rows, unknown=unknown)
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
            most = int(gb // each)
            smaller = None if fits or most else fitting_micro_batch(s, cfg, dtype, gb, rows)
            if smaller:
                line += f" (fits at {split(cfg, *smaller)})"
            if not fits and refuse:
                raise ConfigError(
                    f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: {jobs_per_gpu} jobs of {each:.1f} "
                    f"GB each (estimate) exceed the {gb:.0f} GB of {what}; fix: hydra.launcher.jobs_per_gpu="
                    f"{max(most, 1)}"
                    + (
                        ""
                        if most
                        else f", {split(cfg, *smaller)}"
                        if smaller
                        else " (not even one row at a time fits with gradient checkpointing: a shorter "
                        "train.max_length, model.quantization=4bit or a larger GPU)"
                    )
                )
        lines.append(line)
    return lines, largest
