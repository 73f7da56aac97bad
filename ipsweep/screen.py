"""`ipsweep screen`: rank every prompt of a setting's library by elicitation strength on the base
model, without training. Every configured estimator, their agreement (Spearman across prompts, with CI),
a surface-form check of the log-prob estimators, a table and a plot."""

from __future__ import annotations

import string
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ipsweep import elicit, engine, lm, models, prompts, validate
from ipsweep.analysis import correlation
from ipsweep.config import ESTIMATORS
from ipsweep.errors import ConfigError
from ipsweep.evaluate import chats_for, protocol
from ipsweep.settings.base import build

# Rewrites of a prompt that keep what it asks for: a log-prob estimate that moves under them measures wording.
SURFACE_FORMS = {
    "upper": str.upper,
    "lower": str.lower,
    "no_punctuation": lambda t: t.translate(str.maketrans("", "", string.punctuation)).strip(),
}
# Flag a prompt when a rewrite moves its estimate by more than this share of the inoculation prompts' spread.
FLAG_SHARE = 0.25
LOGPROB = tuple(elicit.LOGPROB_ESTIMATORS)


def screen(cfg, surface: bool = True, workdir: Path | None = None) -> pd.DataFrame:
    setting = build(cfg.setting)
    library = prompts.library(cfg.setting)
    examples = setting.eval_examples(cfg.eval.n_eval)
    if cfg.eval.engine == "vllm":
        _sample_with_engine(cfg, setting, examples, list(library.values()), workdir)
    model, tokenizer = models.load(cfg.model)
    rows = []
    for p in library.values():
        e = elicit.elicitation(cfg, setting, model, tokenizer, examples, p)
        row = {
            "setting": cfg.setting.name,
            "model": cfg.model.name,
            "prompt": p.name,
            "role": p.role,
            "placement": p.placement,
            "text": p.text,
        }
        for est, v in e.items():
            row.update({est: v["estimate"], f"{est}_lo": v["lo"], f"{est}_hi": v["hi"]})
        if "sampled" in e:
            row["behaviour_with_prompt"] = e["sampled"]["with_prompt"]["rate"]
            row["behaviour_without"] = e["sampled"]["without"]["rate"]
        for est in (est for est in LOGPROB if est in e and surface):
            for form, rewrite in SURFACE_FORMS.items():
                variant = replace(p, text=rewrite(p.text))
                row[f"{est}_{form}"] = elicit.LOGPROB_ESTIMATORS[est](
                    cfg, setting, model, tokenizer, variant
                )["estimate"]
        rows.append(row)
    table = pd.DataFrame(rows)
    if surface:
        table = flag_surface(table)
    sort = [c for c in ESTIMATORS if c in table]
    return table.sort_values(sort, ascending=False).reset_index(drop=True)


def _sample_with_engine(cfg, setting, examples, library: list, workdir: Path | None) -> None:
    """eval.engine=vllm: one engine process generates the sampled estimator's replies for every prompt the
    cache lacks (before the HF model takes memory), after the gate checks it against HF on the base model."""
    problems = validate.engine_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    pending = elicit.sampled_requests(cfg, setting, examples, library)
    if not pending:
        return
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ipsweep-screen-"))
    model, tokenizer = models.load(cfg.model)
    stop = lm.stop_token_ids(model, tokenizer)
    del model
    folder = engine.model_folder(cfg, workdir / "model")
    gate_chats = chats_for(setting, examples[: cfg.eval.vllm.gate_prompts], None)
    requests = [r for _, r in pending] + engine.gate_requests(gate_chats, {})
    version, texts, firsts = engine.generate(cfg, tokenizer, stop, folder, requests, workdir / "engine")
    engine.require_passed(engine.gate(cfg, gate_chats, texts, firsts, {0: None}))
    dtype = models.numerics(cfg.model)["dtype"]
    elicit.keep_sampled(
        cfg,
        setting,
        examples,
        pending,
        texts,
        lambda d: protocol(d, tokenizer, stop, "vllm", version, dtype, adapter=None, step=0),
    )


def flag_surface(table: pd.DataFrame) -> pd.DataFrame:
    """`<est>_surface_shift`: the largest move of a prompt's estimate under the SURFACE_FORMS rewrites;
    `<est>_surface_flag`: that move exceeds FLAG_SHARE of the spread (max - min) of the inoculation prompts'
    estimates."""
    out = table.copy()
    for est in (e for e in LOGPROB if f"{e}_upper" in out):
        shifts = np.column_stack([(out[f"{est}_{form}"] - out[est]).abs() for form in SURFACE_FORMS])
        out[f"{est}_surface_shift"] = shifts.max(axis=1)
        ip = out.loc[out.role == "inoculation", est]
        spread = float(ip.max() - ip.min()) if len(ip) >= 2 else np.nan
        out[f"{est}_spread"] = spread
        out[f"{est}_surface_flag"] = out[f"{est}_surface_shift"] > FLAG_SHARE * spread
    return out


def agreement(table: pd.DataFrame, a: str = "sampled", b: str = "logprob") -> dict | None:
    """Spearman rank correlation of two estimators across prompts, with its 95% CI (Bonett-Wright)."""
    if not {a, b} <= set(table) or len(table) < 3:
        return None
    constant = [e for e in (a, b) if table[e].nunique() < 2]
    if constant:
        return {"undefined": f"{', '.join(constant)} is the same for every prompt"}
    c = correlation.correlation(table[a], table[b], n_permutations=2000)
    return {
        "spearman": c["spearman"],
        "lo": c["spearman_lo"],
        "hi": c["spearman_hi"],
        "p": c["spearman_p"],
        "prompts": len(table),
    }


def plot(table: pd.DataFrame, title: str, path: Path) -> Path:
    from ipsweep.analysis.plots import pyplot, save

    plt = pyplot()
    ests = [e for e in ESTIMATORS if e in table]
    fig, axes = plt.subplots(1, len(ests), figsize=(5.5 * len(ests), 0.45 * len(table) + 1.5), squeeze=False)
    for ax, est in zip(axes[0], ests):
        t = table.sort_values(est)
        ax.errorbar(
            t[est], range(len(t)), xerr=[t[est] - t[f"{est}_lo"], t[f"{est}_hi"] - t[est]], fmt="o", capsize=3
        )
        if f"{est}_upper" in t:  # the surface-form rewrites of each prompt, as small marks
            for form, marker in zip(SURFACE_FORMS, "^v|"):
                ax.plot(t[f"{est}_{form}"], range(len(t)), marker, color="grey", ms=4, label=form)
            ax.legend(fontsize=7, title="rewritten", title_fontsize=7)
        ax.set_yticks(range(len(t)), [f"{p} ({r})" for p, r in zip(t.prompt, t.role)], fontsize=8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(
            {
                "sampled": "E sampled: b(with prompt) - b(without), 95% CI",
                "logprob": "E logprob: change in log p(shows) - log p(lacks), nats/token, 95% CI",
                "logprob_train": "E logprob_train (wording-confounded): nats/token gain on training replies",
            }[est]
        )
    fig.suptitle(title)
    return save(fig, path)
