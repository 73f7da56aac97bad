"""Value checks the schema cannot express (ranges, choices, options that contradict each other).

Run by plan() for every point before the first job of a sweep starts. All problems are reported at
once, each with its fix.
"""

from __future__ import annotations

import math

from ipsweep import prompts
from ipsweep.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp16")
ESTIMATORS = ("sampled", "logprob")
SAMPLINGS = ("group_by_length", "random")


def _problems(cfg) -> list[str]:
    t, e, out = cfg.train, cfg.eval, []

    def at_least(key: str, value, low, optional: bool = False) -> None:
        if value is None and optional:
            return
        if value is None or value < low:
            out.append(f"{key}={value} must be >= {low}; fix: {key}=<a value >= {low}>" + (" (or null)" if optional else ""))

    for key in ("epochs", "batch_size", "grad_accum", "max_length"):
        at_least(f"train.{key}", t[key], 1)
    at_least("train.n_train", t.n_train, 1, optional=True)
    at_least("train.warmup_steps", t.warmup_steps, 0)
    at_least("train.lora.r", t.lora.r, 1)
    if not (math.isfinite(t.lr) and t.lr > 0):
        out.append(f"train.lr={t.lr} must be a positive finite number; fix: e.g. train.lr=5e-4")
    if not 0 <= t.lora.dropout < 1:
        out.append(f"train.lora.dropout={t.lora.dropout} must be in [0, 1); fix: e.g. train.lora.dropout=0.05")
    at_least("eval.n_eval", e.n_eval, 1, optional=True)
    for key in ("max_new_tokens", "samples_per_prompt", "batch_size"):
        at_least(f"eval.{key}", e[key], 1)
    if not (math.isfinite(e.temperature) and e.temperature >= 0):
        out.append(f"eval.temperature={e.temperature} must be >= 0 (0 = greedy); fix: eval.temperature=0 or e.g. 0.7")
    if not 0 < e.top_p <= 1:
        out.append(f"eval.top_p={e.top_p} must be in (0, 1]; fix: e.g. eval.top_p=0.9")
    if e.temperature == 0 and e.samples_per_prompt > 1:
        out.append(f"eval.samples_per_prompt={e.samples_per_prompt} with greedy decoding (eval.temperature=0) repeats one "
                   "completion and makes the CIs too narrow; fix: eval.samples_per_prompt=1, or sample with eval.temperature>0")
    if e.temperature == 0 and e.top_p < 1:
        out.append(f"eval.top_p={e.top_p} has no effect with greedy decoding (eval.temperature=0); "
                   "fix: eval.top_p=1.0, or sample with eval.temperature>0")
    if e.test_grid and not any(p.role == "safety" for p in prompts.library(cfg.setting).values()):
        out.append(f"eval.test_grid=true tests with the library's safety prompts, but setting '{cfg.setting.name}' has none; "
                   "fix: add one (+setting.prompts.<name>={text: ..., role: safety}) or eval.test_grid=false")
    if t.sampling not in SAMPLINGS:
        out.append(f"train.sampling={t.sampling} is unknown; fix: one of {', '.join(SAMPLINGS)}")
    if cfg.model.dtype not in DTYPES:
        out.append(f"model.dtype={cfg.model.dtype} is unknown; fix: one of {', '.join(DTYPES)}")
    unknown = sorted(set(cfg.elicit.estimators) - set(ESTIMATORS))
    if unknown:
        out.append(f"elicit.estimators has unknown {', '.join(unknown)}; fix: a subset of [{', '.join(ESTIMATORS)}]")
    at_least("elicit.logprob_examples", cfg.elicit.logprob_examples, 1)
    if cfg.logger.backend not in ("wandb", "none"):
        out.append(f"logger.backend={cfg.logger.backend} is unknown; fix: logger=wandb or logger=none")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        out.append(f"logger.mode={cfg.logger.mode} is unknown; fix: one of offline, online, disabled")
    return out


def check_values(cfg) -> None:
    problems = _problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))
