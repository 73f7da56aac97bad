"""`ipsweep screen`: rank every prompt of a setting's library by elicitation strength on the base
model, without training. Both estimators, their agreement (Spearman across prompts), a table and a plot."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy import stats

from ipsweep import elicit, models, prompts
from ipsweep.settings.base import build


def screen(cfg) -> pd.DataFrame:
    setting = build(cfg.setting)
    library = prompts.library(cfg.setting)
    model, tokenizer = models.load(cfg.model)
    examples = setting.eval_examples(cfg.eval.n_eval)
    rows = []
    for p in library.values():
        e = elicit.elicitation(cfg, setting, model, tokenizer, examples, p)
        row = {"prompt": p.name, "role": p.role, "placement": p.placement, "text": p.text}
        for est, v in e.items():
            row.update({est: v["estimate"], f"{est}_lo": v["lo"], f"{est}_hi": v["hi"]})
        if "sampled" in e:
            row["behaviour_with_prompt"] = e["sampled"]["with_prompt"]["rate"]
            row["behaviour_without"] = e["sampled"]["without"]["rate"]
        rows.append(row)
    sort = [c for c in ("sampled", "logprob") if c in rows[0]]
    return pd.DataFrame(rows).sort_values(sort, ascending=False).reset_index(drop=True)


def agreement(table: pd.DataFrame) -> dict | None:
    """Spearman rank correlation of the two estimators across prompts."""
    if not {"sampled", "logprob"} <= set(table) or len(table) < 3:
        return None
    constant = [e for e in ("sampled", "logprob") if table[e].nunique() < 2]
    if constant:
        return {"undefined": f"{', '.join(constant)} is the same for every prompt"}
    res = stats.spearmanr(table.sampled, table.logprob)
    return {"spearman": float(res.statistic), "p": float(res.pvalue), "prompts": len(table)}


def plot(table: pd.DataFrame, title: str, path: Path) -> Path:
    from ipsweep.analysis import pyplot

    plt = pyplot()
    ests = [e for e in ("sampled", "logprob") if e in table]
    fig, axes = plt.subplots(1, len(ests), figsize=(5.5 * len(ests), 0.45 * len(table) + 1.5), squeeze=False)
    for ax, est in zip(axes[0], ests):
        t = table.sort_values(est)
        ax.errorbar(t[est], range(len(t)), xerr=[t[est] - t[f"{est}_lo"], t[f"{est}_hi"] - t[est]], fmt="o", capsize=3)
        ax.set_yticks(range(len(t)), [f"{p} ({r})" for p, r in zip(t.prompt, t.role)], fontsize=8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel({"sampled": "E sampled: b(with prompt) - b(without), 95% CI",
                       "logprob": "E logprob: nats/token gain on training replies, 95% CI"}[est])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
