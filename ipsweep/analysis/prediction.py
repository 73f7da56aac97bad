"""Does elicitation predict the effect, and could this design tell: the correlation and power tables of an
analysis, from the effects and elicitation tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ipsweep.analysis import correlation, power
from ipsweep.config import ESTIMATORS, SUBSETS
from ipsweep.stats import wilson


def se_from_ci(lo, hi) -> float:
    return (
        (hi - lo) / (2 * correlation.Z95)
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
        else np.nan
    )


def correlation_table(
    effects: pd.DataFrame, elicitation: pd.DataFrame, n_permutations: int = 9999, reference_r: float = 0.57
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Elicitation vs inoculation effect, one point per IP-style prompt, per setting, epoch and estimator,
    for every IP-style prompt and for the inoculation-role ones alone; then pooled across settings as a
    random-effects meta-analysis of Fisher z. Returns (correlations, leave-one-prompt-out influence)."""
    ip = (
        effects[(effects.condition == "ip")].dropna(subset=["effect"])
        if "effect" in effects
        else pd.DataFrame()
    )
    rows, infl = [], []
    if ip.empty:
        return pd.DataFrame(), pd.DataFrame()
    for est in ESTIMATORS:
        col = f"elicit_{est}"
        if ip[col].isna().all():
            continue
        for (epoch, subset), e in [
            ((ep, sub), g[g.role == "inoculation"] if sub == "inoculation prompts" else g)
            for ep, g in ip.groupby("epoch")
            for sub in ("IP-style prompts", "inoculation prompts")
        ]:
            per_setting = []
            for (setting, design, var), s in e.dropna(subset=[col]).groupby(["setting", "design", "variant"]):
                el = (
                    elicitation[(elicitation.setting == setting) & (elicitation.get("variant", "") == var)]
                    .drop_duplicates("prompt")
                    .set_index("prompt")
                    if not elicitation.empty
                    else None
                )
                sx = [
                    (
                        se_from_ci(el.at[p, f"{est}_lo"], el.at[p, f"{est}_hi"])
                        if el is not None and p in el.index
                        else np.nan
                    )
                    for p in s.prompt
                ]
                c = correlation.correlation(s[col], s.effect, n_permutations=n_permutations)
                row = {
                    "setting": setting,
                    "design": design,
                    "variant": var,
                    "epoch": epoch,
                    "estimator": est,
                    "prompts": subset,
                    **c,
                    **correlation.slopes(s[col], s.effect, sx, s.effect_se),
                    f"power_at_r{reference_r}": power.correlation_power(reference_r, c["points"]),
                    "smallest_r_80pct": power.smallest_correlation(c["points"]),
                }
                rows.append(row)
                if not var:  # pooled across settings: each setting's prompts as the library places them, once
                    per_setting.append(row)
                if subset == "IP-style prompts":
                    i = correlation.influence(s[col], s.effect, list(s.prompt))
                    if not i.empty:
                        infl.append(i.assign(setting=setting, design=design, epoch=epoch, estimator=est))
            if len(per_setting) > 1:
                m = correlation.meta_correlation(
                    [r["pearson"] for r in per_setting], [r["points"] for r in per_setting]
                )
                rows.append(
                    {
                        "setting": "pooled (random-effects, Fisher z)",
                        "epoch": epoch,
                        "estimator": est,
                        "prompts": subset,
                        "points": sum(r["points"] for r in per_setting),
                        "pooled_settings": ", ".join(
                            sorted(r["setting"] for r in per_setting if np.isfinite(r["pearson"]))
                        ),
                        **m,
                    }
                )
    return pd.DataFrame(rows), (pd.concat(infl, ignore_index=True) if infl else pd.DataFrame())


def power_table(conditions: pd.DataFrame, effects: pd.DataFrame, reference_r: float = 0.57) -> pd.DataFrame:
    """What this sweep could detect at 80% power: the smallest effect given its items and the control's rate
    (one seed, two proportions: the planning rule), the smallest effect given the standard errors its effect
    intervals measured (seed and item variation, the seed part pooled over its arms), and the smallest
    correlation given its prompts; its power for the paper's r (0.57); and the seed sd on the logit scale
    its arms share (pooled; nan where it could not be pooled), which `ipsweep power --pilot` plans with."""
    rows = []
    if conditions.empty or "behaviour" not in conditions:
        return pd.DataFrame()
    ctrl = conditions[conditions.arm == "control"]
    for (setting, design, epoch), c in ctrl.groupby(["setting", "design", "epoch"]):
        e = (
            effects[(effects.setting == setting) & (effects.design == design) & (effects.epoch == epoch)]
            if not effects.empty
            else effects
        )
        prompts_n = int((e.condition == "ip").sum()) if not e.empty else 0
        # the same model as the effect intervals: their median standard error, at 80% power and alpha 0.05
        # (degenerate arms, every difference equal, have se 0: they say nothing about the design's noise)
        se = (
            e.loc[(e.condition == "ip") & (e.effect_se > 0), "effect_se"].median()
            if "effect_se" in e
            else np.nan
        )
        pooled_sd = e["effect_pooled_seed_sd"].median() if "effect_pooled_seed_sd" in e else np.nan
        items = int(c.behaviour_items.iloc[0])
        rate = float(c.behaviour.iloc[0])
        rows.append(
            {
                "setting": setting,
                "design": design,
                "epoch": epoch,
                "items": items,
                "control_rate": rate,
                "smallest_effect_80pct": power.smallest_effect(rate, items) if 0 < rate else np.nan,
                "smallest_effect_80pct_measured": power.detectable(se),
                "seed_sd_logit": pooled_sd,
                "ip_prompts": prompts_n,
                "smallest_r_80pct": power.smallest_correlation(prompts_n),
                f"power_at_r{reference_r}": power.correlation_power(reference_r, prompts_n),
                f"prompts_for_r{reference_r}": power.points_needed(reference_r),
            }
        )
    return pd.DataFrame(rows)


def tests_computed(correlations: pd.DataFrame) -> int:
    """How many correlation tests (a Pearson and a Spearman p-value per row) the table computed."""
    cols = [c for c in ("pearson_p", "spearman_p") if c in correlations]
    return int(correlations[cols].notna().sum().sum()) if cols else 0


def _hits(effects: pd.DataFrame, elicitation: pd.DataFrame, test: dict, setting: str) -> dict:
    """How often the prediction "inoculates / does not" held: a prompt is predicted to inoculate when its
    estimate exceeds every placebo and neutral prompt's, and inoculates when its effect interval lies above
    0 (IP-style prompts that were trained, at the test's epoch)."""
    estimator = test["estimator"]
    if elicitation.empty or estimator not in elicitation or effects.empty:
        return {}
    el = (
        elicitation[elicitation.setting == setting]
        .drop_duplicates("prompt")
        .set_index("prompt")[["role", estimator]]
    )
    bar = el.loc[el.role.isin(["placebo", "neutral"]), estimator].max()
    ip = effects[
        (effects.setting == setting) & (effects.condition == "ip") & (effects.epoch == test["epoch"])
    ]
    trained = ip[(ip.variant.fillna("") == "") & ip.prompt.isin(el.index)]
    if trained.empty or not np.isfinite(bar):
        return {}
    predicted = el.loc[trained.prompt, estimator].to_numpy() > bar
    measured = trained.effect_lo.to_numpy() > 0
    k, n = int((predicted == measured).sum()), len(trained)
    lo, hi = wilson(k, n)
    return {"hit_rate": k / n, "hit_rate_ci": f"[{lo:.2f}, {hi:.2f}]", "hits": f"{k}/{n}"}


def _declared_p(r, p_two_sided, alternative: str) -> float:
    """The p-value of the declared alternative, from the two-sided permutation p (the pairings permutation
    null is symmetric about 0: a one-sided p is half the two-sided one on the declared side)."""
    if r is None or p_two_sided is None or not np.isfinite(r) or not np.isfinite(p_two_sided):
        return np.nan
    if alternative == "two-sided":
        return float(p_two_sided)
    on_side = r > 0 if alternative == "greater" else r < 0
    return float(p_two_sided / 2 if on_side else 1 - p_two_sided / 2)


def _verdict(p: float, test: dict) -> str:
    """The declared success criterion, applied: the test holds when its declared p is below its alpha."""
    alpha, alternative = test.get("alpha", 0.05), test.get("alternative", "two-sided")
    if not np.isfinite(p):
        return "not computed"
    side = {"greater": "> 0", "less": "< 0", "two-sided": "!= 0"}[alternative]
    held = "holds" if p < alpha else "does not hold"
    return f"{held}: {test['statistic']} {side}, p = {p:.3f} {'<' if p < alpha else '>='} {alpha:g}"


def primary_table(
    correlations: pd.DataFrame, declared: list[dict], effects: pd.DataFrame, elicitation: pd.DataFrame
) -> pd.DataFrame:
    """The declared primary test of each sweep (plan.read_primary, with `sweep` and the first run's start
    `first_run`), with its result: the correlation-table row(s) it names, and for a declared prediction (a
    frozen screen) its hit rate (_hits). `pre_registered`: declared before any run of its sweep existed or
    started, and for a prediction, its frozen screen table unchanged since; `attested`: git holds it (the
    commit checked out, with a clean tree, when it was declared): it does not rest on ipsweep's own files."""
    rows = []
    for d in declared:
        test = d["test"]
        hit = (
            correlations[
                (correlations.estimator == test["estimator"])
                & (correlations.prompts == SUBSETS[test["prompts"]])
                & (correlations.epoch == test["epoch"])
                & correlations.design.notna()
                & (correlations.variant.fillna("") == "")
            ]
            if not correlations.empty
            else pd.DataFrame()
        )
        stat = test["statistic"]
        head = {
            "sweep": d["sweep"],
            **test,
            "declared": d["declared"],
            "first_run": d["first_run"],
            "pre_registered": d["runs_before"] == 0
            and (d["first_run"] is None or d["declared"] <= d["first_run"])
            and d.get("screen_unchanged", True),
            "screen_unchanged": d.get("screen_unchanged"),
            # what git attests: the commit the sweep was declared from, with a clean tree (plan.attestation)
            "attested": bool(d.get("attested")),
            "commit": (d.get("commit") or "")[:12],
            "commit_time": d.get("commit_time"),
            "unattested_why": None
            if d.get("attested")
            else d.get("why_not", "declared before the manifest recorded a git commit"),
        }
        for r in hit.to_dict("records") or [{}]:
            hits = test.get("screen") and _hits(effects, elicitation, test, r.get("setting"))
            p = _declared_p(r.get(stat), r.get(f"{stat}_p"), test.get("alternative", "two-sided"))
            rows.append(
                {
                    **head,
                    "setting": r.get("setting"),
                    "design": r.get("design"),
                    "points": r.get("points"),
                    stat: r.get(stat),
                    f"{stat}_lo": r.get(f"{stat}_lo"),
                    f"{stat}_hi": r.get(f"{stat}_hi"),
                    f"{stat}_p": r.get(f"{stat}_p"),
                    "p_declared": p,
                    "verdict": _verdict(p, test),
                    **(hits or {}),
                }
            )
    return pd.DataFrame(rows)
