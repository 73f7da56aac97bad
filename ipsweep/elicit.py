"""Elicitation strength E(prompt) of a prompt on the *base* model, before any fine-tuning.

Estimators (design §2; docs/elicitation.md):
- `sampled`: b(prompt inserted at test time) - b(no prompt), from the same batched generation and
  scorers as every other evaluation, on the same items, with `elicit.samples` completions per item at
  `elicit.temperature` (0: greedy, one reply); 95% CI paired by item (Newcombe's paired interval for one
  reply per item, a t-interval on the per-item rate differences otherwise).
- `logprob` (contrastive): for each of the setting's contrast pairs (a reply that shows the behaviour and
  a matched one that does not), the change when the prompt is inserted in log p(shows) - log p(lacks),
  per reply token; no generation. Paired over pairs; t-interval. A prompt's wording that makes every
  reply likelier (or less likely) cancels; only a shift toward the behaviour counts.
- `logprob_train`: the earlier log-prob gain of the training replies, for comparison only (confounded by
  the prompt's wording; not in the defaults).

Both are cached as JSON keyed by a hash of everything that determines them (model, setting data,
eval or estimator settings, prompt text and placement), so every run and sweep on the machine
computes each (model, setting, prompt) once. The untrained model's evaluation (epoch 0 of every run)
is the `sampled` estimator's raw material and shares the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ipsweep import cache, engine, identity, lm, models, prompts
from ipsweep.errors import ConfigError
from ipsweep.evaluate import chats_for, evaluate, score
from ipsweep.settings.base import ContrastPair, insert
from ipsweep.stats import paired_difference


def cache_root(cfg) -> Path:
    if cfg.elicit.cache_dir:
        return Path(cfg.elicit.cache_dir).expanduser()
    return cache.root() / "elicitation"


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _cache_path(cfg, kind: str, key_data: dict) -> Path:
    key = cache.digest({"kind": kind, "v": identity.SIGNATURE_VERSION, **key_data})
    path = cache_root(cfg) / kind / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _cached(cfg, kind: str, key_data: dict, compute) -> dict:
    return cache.cached_json(_cache_path(cfg, kind, key_data), compute)  # concurrent jobs compute it once


def _model_key(cfg) -> dict:
    """The model's config without device, dtype, quantization and attention kernel as written (they enter
    resolved, with the inputs) and without its placement."""
    return identity.without(_plain(cfg.model), *models.RESOLVED)


def _setting_key(cfg, setting) -> dict:
    """The setting's config and the content of its data files and of the model's weights (edited data is a
    miss). Not the flawed share: elicitation reads the untrained model and the setting's flawed replies."""
    return {
        **{k: v for k, v in _plain(cfg.setting).items() if k not in ("prompts", "flawed_share")},
        "inputs": identity.inputs(cfg, setting),
    }


def _base_eval_key(cfg, setting, prompt: prompts.Prompt, eval_cfg) -> dict:
    eval_key = identity.eval_identity(
        {
            k: v
            for k, v in _plain(eval_cfg).items()
            if k not in ("extra_test_prompts", "test_grid", "base", "leak_tests")
        }
    )
    return {
        "model": _model_key(cfg),
        "setting": _setting_key(cfg, setting),
        "eval": eval_key,
        "prompt": [prompt.text, prompt.placement],
    }


BASE_EVAL_KEYS = ("metrics", "by_group", "items", "samples", "protocol")


def _stored(result: dict) -> dict:
    """The part of an evaluation the base_eval cache keeps and returns."""
    return {k: result[k] for k in BASE_EVAL_KEYS if k in result}


def base_eval(cfg, setting, model, tokenizer, examples, prompt: prompts.Prompt, eval_cfg=None) -> dict:
    """The untrained model's metrics with `prompt` inserted at test time (NO_PROMPT: unmodified), decoded with
    `eval_cfg` (default: cfg.eval, as every run's epoch 0)."""
    eval_cfg = cfg.eval if eval_cfg is None else eval_cfg

    def compute() -> dict:
        result = evaluate(model, tokenizer, setting, examples, prompt, eval_cfg)
        return {"test_prompt": prompt.name, **_stored(result)}

    return _stored(_cached(cfg, "base_eval", _base_eval_key(cfg, setting, prompt, eval_cfg), compute))


def _base_eval_path(cfg, setting, prompt: prompts.Prompt, eval_cfg=None) -> Path:
    eval_cfg = cfg.eval if eval_cfg is None else eval_cfg
    return _cache_path(cfg, "base_eval", _base_eval_key(cfg, setting, prompt, eval_cfg))


def cached_base_eval(cfg, setting, prompt: prompts.Prompt, eval_cfg=None) -> dict | None:
    """The untrained model's evaluation under `eval_cfg` (default cfg.eval) from the cache, or None (the vLLM
    engine computes the missing ones in its own process, then keeps them with keep_base_eval)."""
    hit = cache.read_json(_base_eval_path(cfg, setting, prompt, eval_cfg))
    return None if hit is None else _stored(hit)


def keep_base_eval(cfg, setting, prompt: prompts.Prompt, result: dict, eval_cfg=None) -> None:
    path = _base_eval_path(cfg, setting, prompt, eval_cfg)
    cache.atomic_write_json(path, {"test_prompt": prompt.name, **_stored(result)})


def item_rates(evaluation: dict, metric: str) -> dict[str, float]:
    """Per eval item: the share of its samples that show `metric` (items the metric does not apply to are left
    out)."""
    return {i["id"]: i[metric][0] / i[metric][1] for i in evaluation["items"] if metric in i and i[metric][1]}


def sampled(plain: dict, prompted: dict, metric: str) -> dict:
    """E = b(prompted) - b(plain) over the same items, with a 95% CI paired by item
    (stats.paired_difference)."""
    x, y = item_rates(prompted, metric), item_rates(plain, metric)
    common = sorted(set(x) & set(y))
    r = paired_difference([x[i] for i in common], [y[i] for i in common])
    return {**r, "with_prompt": prompted["metrics"][metric], "without": plain["metrics"][metric]}


def _mean_logprobs(
    model,
    tokenizer,
    chats: list[tuple[list[dict], str]],
    max_length: int,
    first_tokens: int | None,
    end_of_turn: bool,
) -> np.ndarray:
    """Mean log-prob per scored reply token, one per (messages, reply); NaN where truncation left no reply
    token."""
    scored = lm.reply_logprobs(model, tokenizer, chats, max_length, first_tokens, end_of_turn)
    return np.where(scored[:, 1] > 0, scored[:, 0] / np.maximum(scored[:, 1], 1), np.nan)


def _contrasts(model, tokenizer, pairs: list[ContrastPair], max_length: int) -> np.ndarray:
    """Per pair: mean log-prob per token of the reply that shows the behaviour minus that of the matched reply
    (reply text only, no end-of-turn tokens). Each side is averaged over its own tokens, so a prompt that
    shifts every token's log-prob by the same amount moves both sides equally and cancels."""

    def score(side: str) -> np.ndarray:
        chats = [(p.messages, getattr(p, side)) for p in pairs]
        return _mean_logprobs(model, tokenizer, chats, max_length, None, end_of_turn=False)

    return score("shows") - score("lacks")


def logprob(cfg, setting, model, tokenizer, prompt: prompts.Prompt) -> dict:
    """Contrastive log-prob elicitation: the change, when the prompt is inserted, in
    log p(reply showing the behaviour) - log p(matched reply without it), per token, averaged over the
    setting's contrast pairs; 95% CI paired by pair (t on the per-pair changes)."""
    n = cfg.elicit.logprob_items
    key = {
        "model": _model_key(cfg),
        "setting": _setting_key(cfg, setting),
        "items": n,
        "max_length": cfg.train.max_length,
    }

    def compute() -> dict:  # only on a cache miss: a hit reads no setting data
        pairs = _contrast_pairs(setting)[:n]
        # The no-prompt side is the same for every prompt: computed once, cached beside.
        without = np.asarray(
            _cached(
                cfg,
                "contrast_base",
                key,
                lambda: {"contrasts": _contrasts(model, tokenizer, pairs, cfg.train.max_length).tolist()},
            )["contrasts"]
        )
        prompted = [ContrastPair(insert(setting, p.messages, prompt), p.shows, p.lacks) for p in pairs]
        with_prompt = _contrasts(model, tokenizer, prompted, cfg.train.max_length)
        kept = np.isfinite(with_prompt) & np.isfinite(without)  # pairs whose replies survive train.max_length
        with_prompt, without = with_prompt[kept], without[kept]
        r = paired_difference(with_prompt, without)
        return {
            **r,
            "positive": int((with_prompt > without).sum()),
            "truncated_away": int((~kept).sum()),
            "contrast_without": float(without.mean()),
            "contrast_with": float(with_prompt.mean()),
        }

    return _cached(cfg, "logprob", {**key, "prompt": [prompt.text, prompt.placement]}, compute)


def _contrast_pairs(setting) -> list[ContrastPair]:
    pairs = setting.contrast_pairs()
    if not pairs:
        raise ConfigError(
            f"setting {type(setting).__name__} supplies no contrast pairs, so the logprob estimator is "
            "undefined; "
            "fix: remove logprob from elicit.estimators, or give the setting data with matched replies"
        )
    return pairs


def logprob_train(cfg, setting, model, tokenizer, prompt: prompts.Prompt) -> dict:
    """The earlier, non-contrastive estimator, kept for comparison only: mean per-token log-prob gain of the
    training replies (their first `elicit.logprob_tokens` tokens, end-of-turn included) when the prompt is
    inserted. It moves with the prompt's wording (an all-caps prompt raises it whatever it asks): see
    README."""
    ecfg = cfg.elicit
    key = {
        "model": _model_key(cfg),
        "setting": _setting_key(cfg, setting),
        "examples": ecfg.logprob_items,
        "tokens": ecfg.logprob_tokens,
        "max_length": cfg.train.max_length,
    }

    def compute() -> dict:
        examples = setting.train_examples()[: ecfg.logprob_items]

        def score(chats):
            return _mean_logprobs(model, tokenizer, chats, cfg.train.max_length, ecfg.logprob_tokens, True)

        base = np.asarray(
            _cached(
                cfg,
                "logprob_train_base",
                key,
                lambda: {"logprobs": score([(ex.messages, ex.completion) for ex in examples]).tolist()},
            )["logprobs"]
        )
        gain = score([(insert(setting, ex.messages, prompt), ex.completion) for ex in examples])
        kept = np.isfinite(gain) & np.isfinite(base)
        return {**paired_difference(gain[kept], base[kept]), "positive": int((gain > base).sum())}

    return _cached(cfg, "logprob_train", {**key, "prompt": [prompt.text, prompt.placement]}, compute)


LOGPROB_ESTIMATORS = {"logprob": logprob, "logprob_train": logprob_train}


def sampling_eval_cfg(cfg, setting):
    """The decoding the sampled estimator uses: the eval config with elicit.temperature and elicit.samples
    (a setting that chooses among fixed replies is scored by HF whatever eval.engine says)."""
    return OmegaConf.merge(
        cfg.eval,
        {
            "temperature": cfg.elicit.temperature,
            "samples_per_prompt": cfg.elicit.samples,
            "engine": "hf" if setting.choices else cfg.eval.engine,
        },
    )


def sampled_requests(cfg, setting, examples, prompt_list: list[prompts.Prompt]) -> list[tuple]:
    """With eval.engine=vllm: the untrained model's evaluations the sampled estimator needs for `prompt_list`
    (and the unprompted one) that the cache lacks, as (prompt, engine.Request) pairs."""
    named = [p for p in prompt_list if p.name != prompts.NONE]
    if "sampled" not in cfg.elicit.estimators or not named or setting.choices:
        return []
    ecfg = sampling_eval_cfg(cfg, setting)
    return [
        (p, engine.Request(f"sampled/{p.name}", None, chats_for(setting, examples, p), eval_cfg=ecfg))
        for p in [prompts.NO_PROMPT, *named]
        if cached_base_eval(cfg, setting, p, ecfg) is None
    ]


def decodes_as_eval(cfg, setting) -> bool:
    """Whether the sampled estimator decodes as every evaluation does (the default, greedy): then its
    unprompted evaluation is epoch 0's."""
    key = _base_eval_key(cfg, setting, prompts.NO_PROMPT, cfg.eval)
    return _base_eval_key(cfg, setting, prompts.NO_PROMPT, sampling_eval_cfg(cfg, setting)) == key


def keep_sampled(cfg, setting, examples, pending: list[tuple], texts: dict, protocol) -> None:
    """Score the engine's replies to sampled_requests and cache them where base_eval finds them;
    `protocol(eval_cfg)` is each evaluation's protocol."""
    for p, request in pending:
        result = score(setting, examples, request.chats, texts[request.key], p)
        keep_base_eval(cfg, setting, p, {**result, "protocol": protocol(request.eval_cfg)}, request.eval_cfg)


def elicitation(cfg, setting, model, tokenizer, examples, prompt: prompts.Prompt, estimators=None) -> dict:
    """The configured estimators (or `estimators`) for one prompt on the (untrained) model; {} for the
    control condition. With eval.engine=vllm the sampled estimator's evaluations come from the cache, which
    the engine filled (sampled_requests); `model` is then not used for it."""
    if prompt.name == prompts.NONE:
        return {}
    out = {}
    for name in cfg.elicit.estimators if estimators is None else estimators:
        if name == "sampled":
            ecfg = sampling_eval_cfg(cfg, setting)
            plain = base_eval(cfg, setting, model, tokenizer, examples, prompts.NO_PROMPT, ecfg)
            prompted = base_eval(cfg, setting, model, tokenizer, examples, prompt, ecfg)
            out["sampled"] = sampled(plain, prompted, setting.behaviour_metric)
        else:
            out[name] = LOGPROB_ESTIMATORS[name](cfg, setting, model, tokenizer, prompt)
    return out
