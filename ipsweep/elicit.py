"""Elicitation strength E(prompt) of a prompt on the *base* model, before any fine-tuning.

Two estimators (design §2):
- `sampled`: b(prompt inserted at test time) - b(no prompt), from the same batched generation and
  scorers as every other evaluation, on the same items; 95% CI paired by item (Newcombe's paired
  interval for one greedy reply per item, a t-interval on item differences otherwise).
- `logprob`: mean per-token log-prob gain of the setting's training completions when the prompt is
  inserted (as it would be in training); no generation. Paired over examples; t-interval.

Both are cached as JSON keyed by a hash of everything that determines them (model, setting data,
eval or estimator settings, prompt text and placement), so every run and sweep on the machine
computes each (model, setting, prompt) once. The untrained model's evaluation (epoch 0 of every run)
is the `sampled` estimator's raw material and shares the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from omegaconf import OmegaConf
from scipy import stats

from ipsweep import prompts, store
from ipsweep import stats as ipstats
from ipsweep.evaluate import evaluate
from ipsweep.settings.base import TrainExample
from ipsweep.train import IGNORE, collator, label_logits, tokenize


def cache_root(cfg) -> Path:
    if cfg.elicit.cache_dir:
        return Path(cfg.elicit.cache_dir).expanduser()
    from ipsweep.models import cache_dir

    return cache_dir().parent / "elicitation"


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _cached(cfg, kind: str, key_data: dict, compute) -> dict:
    key = store.digest({"kind": kind, "v": store.SIGNATURE_VERSION, **key_data})
    path = cache_root(cfg) / kind / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # concurrent jobs compute it once
        hit = store.read_json(path)
        if hit is None:
            hit = compute()
            store.atomic_write_json(path, hit)
    return hit


def _setting_key(cfg, setting) -> dict:
    """The setting's config and the content of its data files and of the model's weights (edited data is a miss)."""
    from ipsweep.plan import inputs

    return {**{k: v for k, v in _plain(cfg.setting).items() if k != "prompts"}, "inputs": inputs(cfg, setting)}


def base_eval(cfg, setting, model, tokenizer, examples, prompt: prompts.Prompt) -> dict:
    """The untrained model's metrics with `prompt` inserted at test time (NO_PROMPT: unmodified)."""
    eval_key = {k: v for k, v in _plain(cfg.eval).items() if k not in ("batch_size", "extra_test_prompts", "test_grid", "base")}

    def compute() -> dict:
        result = evaluate(model, tokenizer, setting, examples, prompt, cfg.eval, cfg.setting.joiner)
        return {"test_prompt": prompt.name, "metrics": result["metrics"], "by_group": result["by_group"],
                "items": result["items"], "samples": result["samples"]}

    hit = _cached(cfg, "base_eval", {"model": _plain(cfg.model), "setting": _setting_key(cfg, setting), "eval": eval_key,
                                     "prompt": [prompt.text, prompt.placement]}, compute)
    return {"metrics": hit["metrics"], "by_group": hit["by_group"], "items": hit["items"], "samples": hit["samples"]}


def item_rates(evaluation: dict, metric: str) -> dict[str, float]:
    """Per eval item: the share of its samples that show `metric` (items the metric does not apply to are left out)."""
    return {i["id"]: i[metric][0] / i[metric][1] for i in evaluation["items"] if metric in i and i[metric][1]}


def sampled(plain: dict, prompted: dict, metric: str) -> dict:
    """E = b(prompted) - b(plain) over the same items, with a 95% CI paired by item (stats.paired_difference)."""
    x, y = item_rates(prompted, metric), item_rates(plain, metric)
    common = sorted(set(x) & set(y))
    r = ipstats.paired_difference([x[i] for i in common], [y[i] for i in common])
    return {**r, "with_prompt": prompted["metrics"][metric], "without": plain["metrics"][metric]}


@torch.no_grad()
def reply_logprobs(model, tokenizer, examples: list[TrainExample], max_length: int, first_tokens: int | None,
                   batch_size: int = 8) -> np.ndarray:
    """Mean log-prob per reply token (the first `first_tokens` of each reply, or all) for each example."""
    rows = [tokenize(tokenizer, ex, max_length) for ex in examples]
    if first_tokens:  # causal: the tokens after the scored ones change nothing, so they are not computed
        for r in rows:
            end = next((i for i, l in enumerate(r["labels"]) if l != IGNORE), len(r["labels"])) + first_tokens
            for k in r:
                r[k] = r[k][:end]
    pad = collator(tokenizer)  # the same batching as training
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = pad(rows[start:start + batch_size]).to(device)
        target = batch["labels"][:, 1:]
        valid = target != IGNORE
        lp = torch.zeros(valid.shape, device=device)
        logits = label_logits(model, batch["input_ids"], batch["attention_mask"], valid)
        lp[valid] = torch.log_softmax(logits, dim=-1).gather(-1, target[valid].unsqueeze(-1)).squeeze(-1)
        out += (lp.sum(1) / valid.sum(1).clamp(min=1)).tolist()
    if was_training:
        model.train()
    return np.asarray(out)


def logprob(cfg, setting, model, tokenizer, prompt: prompts.Prompt) -> dict:
    """Mean per-token log-prob gain (nats) of the training completions with the prompt inserted."""
    ecfg = cfg.elicit
    key = {"model": _plain(cfg.model), "setting": _setting_key(cfg, setting), "examples": ecfg.logprob_examples,
           "tokens": ecfg.logprob_tokens, "max_length": cfg.train.max_length}

    def compute() -> dict:  # only on a cache miss: a hit reads no setting data
        examples = setting.train_examples()[: ecfg.logprob_examples]
        with_prompt = [TrainExample(prompts.insert(ex.messages, prompt, cfg.setting.joiner, getattr(setting, "preamble", "")), ex.completion) for ex in examples]
        # The no-prompt side is the same for every prompt: computed once, cached beside.
        base = np.asarray(_cached(cfg, "logprob_base", key, lambda: {"logprobs": reply_logprobs(
            model, tokenizer, examples, cfg.train.max_length, ecfg.logprob_tokens).tolist()})["logprobs"])
        gain = reply_logprobs(model, tokenizer, with_prompt, cfg.train.max_length, ecfg.logprob_tokens) - base
        mean, sem = float(gain.mean()), float(stats.sem(gain)) if len(gain) > 1 else float("nan")
        lo, hi = stats.t.interval(0.95, len(gain) - 1, loc=mean, scale=sem) if len(gain) > 1 and sem > 0 else (mean, mean)
        return {"estimate": mean, "lo": float(lo), "hi": float(hi), "sem": sem, "n": len(gain),
                "positive": int((gain > 0).sum()), "base_mean_logprob": float(base.mean())}

    return _cached(cfg, "logprob", {**key, "prompt": [prompt.text, prompt.placement]}, compute)


def elicitation(cfg, setting, model, tokenizer, examples, prompt: prompts.Prompt) -> dict:
    """Both estimators for one prompt on the (untrained) model; {} for the control condition."""
    if prompt.name == prompts.NONE:
        return {}
    out = {}
    if "sampled" in cfg.elicit.estimators:
        plain = base_eval(cfg, setting, model, tokenizer, examples, prompts.NO_PROMPT)
        prompted = base_eval(cfg, setting, model, tokenizer, examples, prompt)
        out["sampled"] = sampled(plain, prompted, setting.behaviour_metric)
    if "logprob" in cfg.elicit.estimators:
        out["logprob"] = logprob(cfg, setting, model, tokenizer, prompt)
    return out
