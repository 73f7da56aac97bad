"""Batched generation and scoring: the one code path for every measurement (base model, each epoch,
every test-time prompt), so that compared numbers are made the same way."""

from __future__ import annotations

from collections import defaultdict

import torch
from statsmodels.stats.proportion import proportion_confint
from tqdm.auto import tqdm

from ipsweep import prompts
from ipsweep.errors import OutOfMemory
from ipsweep.settings.base import EvalExample


def rate(k: int, n: int) -> dict:
    """k of n with a Wilson 95% interval."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    return {"k": k, "n": n, "rate": k / n, "lo": float(lo), "hi": float(hi)}


@torch.no_grad()
def generate(model, tokenizer, chats: list[list[dict]], cfg) -> list[list[str]]:
    """`cfg.samples_per_prompt` completions per chat; greedy when cfg.temperature == 0.

    Chats are sorted by length and left-padded in batches, so padding stays small.
    """
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[list[str]] = [[] for _ in texts]
    sample = cfg.temperature > 0
    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), cfg.batch_size), desc="generate", leave=False):
        idx = order[start:start + cfg.batch_size]
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        try:
            gen = model.generate(
                **batch, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                temperature=cfg.temperature if sample else None, top_p=cfg.top_p if sample else None,
                top_k=None, num_return_sequences=cfg.samples_per_prompt,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        except torch.OutOfMemoryError as e:
            raise OutOfMemory(
                f"out of GPU memory while generating (eval.batch_size={cfg.batch_size}, eval.max_new_tokens={cfg.max_new_tokens}); "
                "fix: lower eval.batch_size (results do not change) or eval.max_new_tokens") from e
        decoded = tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = [d.strip() for d in decoded[j * cfg.samples_per_prompt:(j + 1) * cfg.samples_per_prompt]]
    if was_training:
        model.train()
    return out


def choose(model, tokenizer, chats: list[list[dict]], choices: list[str]) -> list[list[str]]:
    """For settings with a fixed set of replies: the reply whose first token is most likely, no generation."""
    from ipsweep.elicit import reply_logprobs
    from ipsweep.settings.base import TrainExample

    pairs = [TrainExample(chat, choice) for chat in chats for choice in choices]
    lp = reply_logprobs(model, tokenizer, pairs, max_length=4096, first_tokens=1).reshape(len(chats), len(choices))
    return [[choices[i]] for i in lp.argmax(axis=1)]


def evaluate(model, tokenizer, setting, examples: list[EvalExample], test_prompt: prompts.Prompt | None,
             cfg, joiner: str = " ") -> dict:
    """Generate (or choose, for a setting with `choices`) for `examples` with `test_prompt` inserted;
    return rates overall and per group, per-item outcomes (`items`: id, group, metric -> [k, n]), and samples."""
    chats = [prompts.insert(ex.messages, test_prompt, joiner, getattr(setting, "preamble", "")) for ex in examples]
    choices = getattr(setting, "choices", None)
    completions = choose(model, tokenizer, chats, choices) if choices else generate(model, tokenizer, chats, cfg)
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    samples, items = [], {}
    for ex, chat, outs in zip(examples, chats, completions):
        item = items.setdefault(ex.item_id, {"id": ex.item_id, "eval_set": ex.eval_set, "group": ex.group})
        for text in outs:
            scores = setting.score(ex, text)
            for metric, value in scores.items():
                if value is None:
                    continue
                for key in [(metric, None, None), (metric, ex.eval_set, None), (metric, ex.eval_set, ex.group)]:
                    counts[key][0] += bool(value)
                    counts[key][1] += 1
                kn = item.setdefault(metric, [0, 0])  # per item: k of n samples show it
                kn[0] += bool(value)
                kn[1] += 1
            samples.append({"item": ex.item_id, "eval_set": ex.eval_set, "group": ex.group,
                            "prompt": chat[-1]["content"], "completion": text, **scores})
    metrics = {m: rate(*counts[(m, None, None)]) for (m, s, g) in counts if s is None}
    by_group = [
        {"metric": m, "eval_set": s, "group": g or "all", **rate(*counts[(m, s, g)])}
        for (m, s, g) in sorted(counts, key=str) if s is not None
    ]
    return {"test_prompt": test_prompt.name if test_prompt else prompts.NONE, "metrics": metrics,
            "by_group": by_group, "items": list(items.values()), "samples": samples}
