"""Value checks the schema cannot express (ranges, choices, options that contradict each other).

Run by plan() for every point before the first job of a sweep starts. All problems are reported at
once, each with its fix.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from collections import Counter
from dataclasses import fields, is_dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import get_type_hints

from omegaconf import OmegaConf

from ipsweep import contrast, models, prompts
from ipsweep.config import (
    ALTERNATIVES,
    ATTN_IMPLEMENTATIONS,
    DEVICES,
    DTYPES,
    ENGINES,
    ESTIMATORS,
    METHODS,
    PLACEMENTS,
    PROMPT_MODES,
    QUANTIZATIONS,
    SAMPLINGS,
    STATISTICS,
    SUBSETS,
    VLLM_LORA_RANKS,
    ElicitConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SettingConfig,
    TrainConfig,
)
from ipsweep.errors import ConfigError


def _primary_problems(cfg) -> list[str]:
    """The declared primary test names an estimator the runs record, a prompt subset, a statistic and an
    epoch the runs reach."""
    p = cfg.get("primary")
    if p is None or p.estimator is None:
        return []
    out = []
    if p.estimator not in cfg.elicit.estimators:
        out.append(
            f"primary.estimator={p.estimator} is not one the runs record (elicit.estimators: "
            f"{', '.join(cfg.elicit.estimators)}); fix: one of those, or add it to elicit.estimators"
        )
    if p.prompts not in SUBSETS:
        out.append(f"primary.prompts={p.prompts} is unknown; fix: one of {', '.join(SUBSETS)}")
    if p.statistic not in STATISTICS:
        out.append(f"primary.statistic={p.statistic} is unknown; fix: one of {', '.join(STATISTICS)}")
    if p.alternative not in ALTERNATIVES:
        out.append(f"primary.alternative={p.alternative} is unknown; fix: one of {', '.join(ALTERNATIVES)}")
    if not 0 < p.alpha < 1:
        out.append(f"primary.alpha={p.alpha} is not a level in (0, 1); fix: e.g. primary.alpha=0.05")
    if p.get("screen") and not Path(p.screen).is_file():
        out.append(
            f"primary.screen={p.screen} is not a file; fix: the elicitation.csv `ipsweep screen --out DIR` "
            "wrote (DIR/elicitation.csv)"
        )
    if not 1 <= p.epoch <= cfg.train.epochs:
        out.append(
            f"primary.epoch={p.epoch} is not an epoch this run evaluates (1..{cfg.train.epochs}); fix: an "
            "epoch every point reaches"
        )
    return out


@functools.cache
def _has_vllm(python: str) -> bool | None:
    """Whether `python` can import vllm (found, not imported: importing takes seconds); None if `python` does
    not run."""
    try:
        found = subprocess.run(
            [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.returncode == 0


def engine_problems(cfg) -> list[str]:
    e = cfg.eval
    if e.engine not in ENGINES:
        return [f"eval.engine={e.engine} is unknown; fix: one of {', '.join(ENGINES)}"]
    if e.engine != "vllm":
        return []
    v, out = e.vllm, []
    python = v.python or sys.executable
    has = _has_vllm(python)
    if has is None:
        out.append(
            f"eval.vllm.python={python} does not run; fix: the interpreter of an environment with vllm "
            "(e.g. eval.vllm.python=.venv-vllm/bin/python after `make vllm`)"
        )
    elif not has:
        out.append(
            f"eval.engine=vllm but {python} cannot import vllm; fix: `make vllm` and "
            "eval.vllm.python=.venv-vllm/bin/python, or pip install vllm there"
        )
    if not 0 <= v.min_agreement <= 1:
        out.append(f"eval.vllm.min_agreement={v.min_agreement} must be a share in [0, 1]; fix: e.g. 0.75")
    for key in ("gate_tokens", "gate_top_k"):
        if v[key] < 1:
            out.append(f"eval.vllm.{key}={v[key]} must be >= 1; fix: e.g. eval.vllm.{key}=64")
    if not v.gate_max_gap >= 0:
        out.append(f"eval.vllm.gate_max_gap={v.gate_max_gap} must be >= 0 (nats); fix: e.g. 0.5")
    if v.gate_prompts < 1:
        out.append(
            f"eval.vllm.gate_prompts={v.gate_prompts} must be >= 1; fix: e.g. eval.vllm.gate_prompts=8"
        )
    if not 0 < v.gpu_memory_utilization <= 1:
        out.append(
            f"eval.vllm.gpu_memory_utilization={v.gpu_memory_utilization} must be in (0, 1]; fix: e.g. 0.85"
        )
    if not v.cpu_kv_cache_gb > 0:
        out.append(f"eval.vllm.cpu_kv_cache_gb={v.cpu_kv_cache_gb} must be > 0 (GiB); fix: e.g. 2")
    if v.timeout_s <= 0:
        out.append(f"eval.vllm.timeout_s={v.timeout_s} gives the engine no time; fix: e.g. 7200 (seconds)")
    if v.max_lora_rank is not None and v.max_lora_rank not in VLLM_LORA_RANKS:
        out.append(
            f"eval.vllm.max_lora_rank={v.max_lora_rank} is not a rank vLLM takes; fix: one of "
            f"{', '.join(map(str, VLLM_LORA_RANKS))} (>= train.lora.r), or null for the smallest that fits"
        )
    elif cfg.train.get("method", "lora") == "lora" and cfg.train.lora.r > (
        v.max_lora_rank or VLLM_LORA_RANKS[-1]
    ):
        out.append(
            f"train.lora.r={cfg.train.lora.r} is above the largest LoRA rank the vLLM engine would take "
            f"({v.max_lora_rank or VLLM_LORA_RANKS[-1]}); fix: a smaller train.lora.r, a larger "
            "eval.vllm.max_lora_rank, or eval.engine=hf"
        )
    return out


def _loading_problems(cfg) -> list[str]:
    """model.quantization, attn_implementation and device_map: known values, and combinations that work."""
    m, out = cfg.model, []
    if m.get("quantization") not in (None, *QUANTIZATIONS):
        out.append(
            f"model.quantization={m.quantization} is unknown; fix: one of {', '.join(QUANTIZATIONS)}, or null"
        )
    elif m.get("quantization"):
        if cfg.eval.engine == "vllm":
            out.append(
                f"model.quantization={m.quantization} with eval.engine=vllm: the engine would serve the "
                "unquantized base model, not the one the adapters were trained on; fix: eval.engine=hf"
            )
    if m.get("attn_implementation") not in (None, *ATTN_IMPLEMENTATIONS):
        out.append(
            f"model.attn_implementation={m.attn_implementation} is unknown; fix: one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}, or null for transformers' default"
        )
    elif str(m.get("attn_implementation")).startswith("flash") and m.get("device") == "cpu":
        out.append(
            f"model.attn_implementation={m.attn_implementation} runs on a GPU only, and model.device=cpu; "
            "fix: model.attn_implementation=sdpa (or null)"
        )
    elif str(m.get("attn_implementation")).startswith("flash_attention") and (
        m.dtype == "fp32" or cfg.train.get("method", "lora") == "full"
    ):
        # flash attention takes fp16/bf16 only: an fp32 model, or a full fine-tune's fp32 weights evaluated
        # after training, would stop at its first attention call
        why = "model.dtype=fp32" if m.dtype == "fp32" else "train.method=full evaluates its fp32 weights"
        out.append(
            f"model.attn_implementation={m.attn_implementation} computes in fp16/bf16 only, and this run "
            f"computes in fp32 ({why}); "
            "fix: model.dtype=bf16 with LoRA, or model.attn_implementation=sdpa"
        )
    if m.dtype == "fp16" and models.resolve_device(m) == "cpu":
        # accelerate has no loss scaler on a CPU: fp16 would train in pure fp16 (lost updates, overflow)
        out.append("model.dtype=fp16 on a CPU trains without a loss scaler; fix: model.dtype=bf16 or fp32")
    if m.get("device_map") not in (None, "auto"):
        out.append(
            f"model.device_map={m.device_map} is unknown; fix: auto (spread over the job's GPUs) or null "
            "(the job's one device)"
        )
    elif m.get("device_map") and m.get("device") == "cpu":
        out.append("model.device_map=auto spreads a model over GPUs, and model.device=cpu; fix: drop it")
    return out


def _axis_problems(cfg) -> list[str]:
    """The research axes: the flawed share, the update method, the paraphrase bank."""
    t, out = cfg.train, []
    share = cfg.setting.get("flawed_share", 1.0)
    if not 0 <= share <= 1:
        out.append(
            f"setting.flawed_share={share} must be a share in [0, 1] (1: every training example shows the "
            "behaviour); fix: e.g. setting.flawed_share=0.5"
        )
    elif share < 1 and cfg.setting.options.get("reward_hack_fraction", 1.0) != 1:
        out.append(
            f"setting.flawed_share={share} and setting.options.reward_hack_fraction="
            f"{cfg.setting.options.reward_hack_fraction} both set the share of hard-coded solutions; fix: "
            "keep one (setting.flawed_share draws which examples with train.seed)"
        )
    method = t.get("method", "lora")
    if method not in METHODS:
        out.append(f"train.method={method} is unknown; fix: one of {', '.join(METHODS)}")
    elif method == "full":
        if cfg.model.get("quantization"):
            out.append(
                f"train.method=full with model.quantization={cfg.model.quantization}: 4-bit weights cannot "
                "be trained; fix: train.method=lora (QLoRA), or drop model.quantization"
            )
        if cfg.eval.engine == "vllm":
            out.append(
                "train.method=full with eval.engine=vllm: the engine serves one base model with adapters, "
                "and a full fine-tune's every epoch is a whole model; fix: eval.engine=hf"
            )
    elif not t.lora.target_modules:
        out.append("train.lora.target_modules is empty; fix: e.g. train.lora.target_modules=[q_proj,v_proj]")
    k = t.get("paraphrases")
    if k is not None and k < 1:
        out.append(f"train.paraphrases={k} must be >= 1; fix: e.g. train.paraphrases=5, or null (all)")
    elif k is not None and k > 1 and t.prompt_mode != "mixed":
        out.append(
            f"train.paraphrases={k} draws from {k} texts, but train.prompt_mode={t.prompt_mode} trains on "
            "one; fix: train.prompt_mode=mixed, or drop train.paraphrases"
        )
    return out


def _problems(cfg) -> list[str]:
    t, e, out = cfg.train, cfg.eval, []

    def at_least(key: str, value, low, optional: bool = False) -> None:
        if value is None and optional:
            return
        if value is None or value < low:
            out.append(
                f"{key}={value} must be >= {low}; fix: {key}=<a value >= {low}>"
                + (" (or null)" if optional else "")
            )

    for key in ("epochs", "batch_size", "grad_accum", "max_length"):
        at_least(f"train.{key}", t[key], 1)
    at_least("train.n_train", t.n_train, 1, optional=True)
    at_least("train.save_steps", t.get("save_steps"), 1, optional=True)
    at_least("train.warmup_steps", t.warmup_steps, 0)
    at_least("train.lora.r", t.lora.r, 1)
    if not (math.isfinite(t.lr) and t.lr > 0):
        out.append(f"train.lr={t.lr} must be a positive finite number; fix: e.g. train.lr=5e-4")
    if not 0 <= t.lora.dropout < 1:
        out.append(
            f"train.lora.dropout={t.lora.dropout} must be in [0, 1); fix: e.g. train.lora.dropout=0.05"
        )
    if t.get("method", "lora") == "lora" and t.lora.alpha <= 0:
        out.append(
            f"train.lora.alpha={t.lora.alpha} scales the adapter by alpha/r = 0 or less: every run would be "
            "the base model (or its opposite); fix: a positive alpha, e.g. train.lora.alpha=16"
        )
    for key in ("weight_decay", "max_grad_norm"):  # AdamW's decay and the clip norm: finite, not negative
        if not (math.isfinite(t[key]) and t[key] >= 0):
            out.append(f"train.{key}={t[key]} must be a finite number >= 0; fix: e.g. train.{key}=0.0")
    at_least("eval.n_eval", e.n_eval, 1, optional=True)
    for key in ("max_new_tokens", "samples_per_prompt", "batch_size"):
        at_least(f"eval.{key}", e[key], 1)
    if not (math.isfinite(e.temperature) and e.temperature >= 0):
        out.append(
            f"eval.temperature={e.temperature} must be >= 0 (0 = greedy); fix: eval.temperature=0 or e.g. 0.7"
        )
    if not 0 < e.top_p <= 1:
        out.append(f"eval.top_p={e.top_p} must be in (0, 1]; fix: e.g. eval.top_p=0.9")
    if e.temperature == 0 and e.samples_per_prompt > 1:
        out.append(
            f"eval.samples_per_prompt={e.samples_per_prompt} with greedy decoding (eval.temperature=0) "
            "repeats one "
            "completion and makes the CIs too narrow; fix: eval.samples_per_prompt=1, or sample with "
            "eval.temperature>0"
        )
    if e.temperature == 0 and e.top_p < 1:
        out.append(
            f"eval.top_p={e.top_p} has no effect with greedy decoding (eval.temperature=0); "
            "fix: eval.top_p=1.0, or sample with eval.temperature>0"
        )
    out += engine_problems(cfg)
    if e.test_grid and not any(p.role == "safety" for p in prompts.library(cfg.setting).values()):
        out.append(
            "eval.test_grid=true tests with the library's safety prompts, but setting "
            f"'{cfg.setting.name}' has none; "
            "fix: add one (+setting.prompts.<name>={text: ..., role: safety}) or eval.test_grid=false"
        )
    if t.sampling not in SAMPLINGS:
        out.append(f"train.sampling={t.sampling} is unknown; fix: one of {', '.join(SAMPLINGS)}")
    if t.prompt_mode not in PROMPT_MODES:
        out.append(f"train.prompt_mode={t.prompt_mode} is unknown; fix: one of {', '.join(PROMPT_MODES)}")
    if cfg.get("prompt_placement") not in (None, *PLACEMENTS):
        out.append(
            f"prompt_placement={cfg.prompt_placement} is unknown; fix: one of {', '.join(PLACEMENTS)}, or "
            "null for "
            "the library's placement"
        )
    if cfg.model.dtype not in DTYPES:
        out.append(f"model.dtype={cfg.model.dtype} is unknown; fix: one of {', '.join(DTYPES)}")
    if cfg.model.get("device", "auto") not in DEVICES:
        out.append(f"model.device={cfg.model.device} is unknown; fix: one of {', '.join(DEVICES)}")
    out += _loading_problems(cfg)
    out += _axis_problems(cfg)
    if not 0 <= t.max_cut_share <= 1:
        out.append(
            f"train.max_cut_share={t.max_cut_share} must be a share in [0, 1]; fix: e.g. "
            "train.max_cut_share=0.01"
        )
    out += _primary_problems(cfg)
    for text in cfg.get("compare") or []:
        try:
            contrast.parse(text)
        except ValueError as e:
            out.append(f"compare: {e}")
    unknown = sorted(set(cfg.elicit.estimators) - set(ESTIMATORS))
    if unknown:
        out.append(
            f"elicit.estimators has unknown {', '.join(unknown)}; fix: a subset of [{', '.join(ESTIMATORS)}]"
        )
    at_least("elicit.logprob_items", cfg.elicit.logprob_items, 1)
    at_least("elicit.samples", cfg.elicit.samples, 1)
    if not (math.isfinite(cfg.elicit.temperature) and cfg.elicit.temperature >= 0):
        out.append(
            f"elicit.temperature={cfg.elicit.temperature} must be >= 0 (0 = greedy); fix: e.g. "
            "elicit.temperature=1.0"
        )
    elif cfg.elicit.temperature == 0 and cfg.elicit.samples > 1:
        out.append(
            f"elicit.samples={cfg.elicit.samples} with greedy decoding (elicit.temperature=0) repeats one "
            "completion; "
            "fix: elicit.samples=1, or sample with e.g. elicit.temperature=1.0"
        )
    if cfg.logger.backend not in ("wandb", "none"):
        out.append(f"logger.backend={cfg.logger.backend} is unknown; fix: logger=wandb or logger=none")
    if cfg.logger.on_no_network not in ("offline", "fail"):
        out.append(f"logger.on_no_network={cfg.logger.on_no_network} is unknown; fix: offline or fail")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        out.append(f"logger.mode={cfg.logger.mode} is unknown; fix: one of offline, online, disabled")
    return out


SCHEMA = {
    "setting": SettingConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "elicit": ElicitConfig,
    "logger": LoggerConfig,
}
# free-form: validated by the prompt library and the Setting class
OPEN = (
    "setting.prompts",
    "setting.options",
)


@functools.lru_cache(maxsize=4096)
def _schema_at(path: tuple[str, ...]):
    """The dataclass that holds the key at `path` (e.g. ('train', 'lora', 'r') -> LoraConfig), or None if
    open."""
    if ".".join(path[:2]) in OPEN or path[0] not in SCHEMA:
        return None
    node = SCHEMA[path[0]]
    for part in path[1:-1]:
        sub = get_type_hints(node).get(part)  # resolved: config.py uses postponed annotations
        node = sub if isinstance(sub, type) and is_dataclass(sub) else None
        if node is None:
            return None
    return node


@functools.lru_cache(maxsize=4096)  # a sweep's pre-flight asks for the same keys at every point
def unknown_key(dotted: str) -> str | None:
    """A message for a key the schema does not have (e.g. train.lrr), listing the valid keys; else None."""
    path = dotted.split(".")
    if len(path) < 2:
        return None
    node = _schema_at(tuple(path))
    if node is None:
        return None
    valid = [f.name for f in fields(node) if not f.name.startswith("_")]
    if path[-1] in valid or path[-1] == "_target_":
        return None
    where = ".".join(path[:-1])
    near = get_close_matches(path[-1], valid, n=1)
    return (
        f"unknown key {dotted}"
        + (f" (did you mean {where}.{near[0]}?)" if near else "")
        + f"; fix: use one of {where}'s keys: {', '.join(valid)}. A '+' does not add keys to ipsweep's config"
    )


def unknown_override_keys(overrides: list[str]) -> list[str]:
    """Messages for command-line overrides (with or without +/++/~) that name keys the schema lacks."""
    out = []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if "=" in o and "/" not in key and not key.startswith("hydra") and (msg := unknown_key(key)):
            out.append(msg)
    return out


def _unknown_in(cfg) -> list[str]:
    """Keys the schema lacks anywhere in a composed config (e.g. added with + or in an experiment file)."""
    out = []

    def walk(node, path):
        for k in node:
            key = [*path, str(k)]
            if (msg := unknown_key(".".join(key))) is not None:
                out.append(msg)
            elif isinstance(node[k], dict) and _schema_at((*key, "x")) is not None:
                walk(node[k], key)

    for group in SCHEMA:  # walked as plain data: fast, and unresolved (interpolations are leaves)
        if group in cfg:
            node = cfg[group]
            walk(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node, [group])
    return out


def _inapplicable(cfg) -> list[str]:
    """Options that the chosen config would silently ignore."""
    out = []
    if cfg.model.path and not models.source(cfg.model).takes_path:
        out.append(
            f"model.path={cfg.model.path} is used only by model=hf; model={cfg.model.name} loads its own "
            "weights "
            "and would ignore it; fix: add model=hf (to load that path), or drop model.path"
        )
    return out


def check_sizes(cfg, setting) -> None:
    """A size larger than the data is an error, never a silent cap (null means all)."""
    problems = []
    if cfg.train.n_train is not None:
        n = len(setting.train_examples())
        if cfg.train.n_train > n:
            problems.append(
                f"train.n_train={cfg.train.n_train} but setting '{cfg.setting.name}' has {n} training "
                "examples; "
                f"fix: train.n_train={n} or train.n_train=null (all)"
            )
    if cfg.eval.n_eval is not None:
        per_set = Counter(ex.eval_set for ex in setting.eval_examples(None))
        most = max(per_set.values(), default=0)
        if cfg.eval.n_eval > most:
            sizes = ", ".join(f"{k}: {v}" for k, v in per_set.items())
            problems.append(
                f"eval.n_eval={cfg.eval.n_eval} but setting '{cfg.setting.name}' has at most {most} eval "
                "items per "
                f"eval set ({sizes}); fix: eval.n_eval={most} or eval.n_eval=null (all)"
            )
    if problems:
        raise ConfigError("; ".join(problems))


def check_values(cfg) -> None:
    problems = _unknown_in(cfg) + _inapplicable(cfg) + _problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))
