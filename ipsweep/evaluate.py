"""Batched generation and scoring: the one code path for every measurement (base model, each epoch,
every test-time prompt), so that compared numbers are made the same way."""

from __future__ import annotations

import hashlib
from collections import defaultdict

from ipsweep import lm, prompts
from ipsweep.settings.base import EvalExample, insert
from ipsweep.stats import wilson


def rate(k: int, n: int) -> dict:
    """k of n with a Wilson 95% interval."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n, "lo": lo, "hi": hi}


def choose(model, tokenizer, chats: list[list[dict]], choices: list[str]) -> list[list[str]]:
    """For settings with a fixed set of replies: the reply whose first token is most likely, no generation."""
    scored = lm.reply_logprobs(
        model, tokenizer, [(chat, c) for chat in chats for c in choices], max_length=4096, first_tokens=1
    )
    lp = scored[:, 0].reshape(len(chats), len(choices))
    return [[choices[i]] for i in lp.argmax(axis=1)]


def evaluate(
    model, tokenizer, setting, examples: list[EvalExample], test_prompt: prompts.Prompt | None, cfg
) -> dict:
    """Generate (or choose, for a setting with `choices`) for `examples` with `test_prompt` inserted;
    return rates overall and per group, per-item outcomes (`items`: id, group, metric -> [k, n]), and
    samples."""
    chats = chats_for(setting, examples, test_prompt)
    choices = setting.choices
    completions = (
        choose(model, tokenizer, chats, choices) if choices else lm.generate(model, tokenizer, chats, cfg)
    )
    return score(setting, examples, chats, completions, test_prompt)


def chats_for(setting, examples: list[EvalExample], test_prompt: prompts.Prompt | None) -> list[list[dict]]:
    """The chats an evaluation generates from: each example with `test_prompt` inserted."""
    return [insert(setting, ex.messages, test_prompt) for ex in examples]


def score(setting, examples, chats, completions: list[list[str]], test_prompt) -> dict:
    """evaluate()'s result from completions made by any engine: the setting's scorers on each."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    samples, items = [], {}
    # every completion scored first, together (a setting may score several at once: sandboxes, judges)
    scored = iter(
        setting.score_many([(ex, text) for ex, outs in zip(examples, completions) for text in outs])
    )
    for ex, chat, outs in zip(examples, chats, completions):
        item = items.setdefault(ex.item_id, {"id": ex.item_id, "eval_set": ex.eval_set, "group": ex.group})
        for text in outs:
            scores = next(scored)
            for metric, value in scores.items():
                if value is None:
                    continue
                for key in [
                    (metric, None, None),
                    (metric, ex.eval_set, None),
                    (metric, ex.eval_set, ex.group),
                ]:
                    counts[key][0] += bool(value)
                    counts[key][1] += 1
                kn = item.setdefault(metric, [0, 0])  # per item: k of n samples show it
                kn[0] += bool(value)
                kn[1] += 1
            samples.append(
                {
                    "item": ex.item_id,
                    "eval_set": ex.eval_set,
                    "group": ex.group,
                    "prompt": chat[-1]["content"],
                    "completion": text,
                    **scores,
                }
            )
    metrics = {m: rate(*counts[(m, None, None)]) for (m, s, g) in counts if s is None}
    by_group = [
        {"metric": m, "eval_set": s, "group": g or "all", **rate(*counts[(m, s, g)])}
        for (m, s, g) in sorted(counts, key=str)
        if s is not None
    ]
    return {
        "test_prompt": test_prompt.name if test_prompt else prompts.NONE,
        "metrics": metrics,
        "by_group": by_group,
        "items": list(items.values()),
        "samples": samples,
    }


def protocol(eval_cfg, tokenizer, stop: list[int], engine: str, version: str, dtype: str, **scored) -> dict:
    """How an evaluation was made, stored with it: the engine and its version, dtype, decoding, stop tokens,
    the chat template's hash and, in `scored`, what was scored (adapter path, optimizer step)."""
    template = tokenizer.chat_template or ""
    return {
        "engine": engine,
        "version": version,
        "dtype": dtype,
        "temperature": eval_cfg.temperature,
        "top_p": eval_cfg.top_p,
        "max_new_tokens": eval_cfg.max_new_tokens,
        "samples_per_prompt": eval_cfg.samples_per_prompt,
        "seed": eval_cfg.seed,
        # both engines decode with these and nothing else: no field of the checkpoint's generation_config
        # (repetition penalty, top-k, n-gram ban...) applies (lm.decoding; the vLLM worker's own defaults)
        "top_k": None,
        "repetition_penalty": 1.0,
        "checkpoint_generation_config": "ignored",
        "stop_token_ids": list(stop),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
        **scored,
    }
