"""The statistics of an IP sweep: pure functions on arrays and tidy tables (no file reading, no plots).

Design (see docs/statistics.md): every evaluation scores the same eval items in every run, seed, epoch
and test prompt, so comparisons are paired by item, and a rate or an effect is a mean over a
seeds x items matrix. Its interval counts both sources of variation, seed-to-seed (training randomness)
and item-to-item (which questions were drawn), through the variance components of a crossed two-way
layout; with one seed only the item part can be estimated, and the result says so.
Tested against closed forms and by simulation (tests/test_stats.py). The intervals a job computes too (a
rate's Wilson interval, Newcombe's paired interval) are ipsweep/stats.py's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special, stats
from scipy.optimize import brentq
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from ipsweep.stats import newcombe_paired, wilson


def _mean_squares(m: np.ndarray) -> tuple[float, float, float]:
    """MS_seeds, MS_items, MS_resid of a seeds x items matrix (two-way ANOVA without replication)."""
    S, I = m.shape  # noqa: E741 (S seeds, I items, as in the docstrings)
    est, seed_means, item_means = m.mean(), m.mean(1), m.mean(0)
    ms_s = I * ((seed_means - est) ** 2).sum() / (S - 1)
    ms_i = S * ((item_means - est) ** 2).sum() / (I - 1)
    resid = m - seed_means[:, None] - item_means[None, :] + est
    return float(ms_s), float(ms_i), float((resid**2).sum() / ((S - 1) * (I - 1)))


def slope(m: np.ndarray) -> float:
    """How far a shift of one logit unit moves this matrix's mean rate: the mean over items of p(1 - p), p
    the item's rate over seeds. Near 0 or 1 a run's seed effect moves the rate little."""
    p = np.asarray(m, float).mean(0)
    return float((p * (1 - p)).mean())


def pooled_seed_variance(runs: list[np.ndarray]) -> dict | None:
    """The seed-to-seed variance of a training run on the logit scale, pooled over the arms of one design
    (the control and every arm with its seeds x items matrix of outcomes): every arm is trained the same way,
    so one variance, scaled to each arm's rate by its `slope`, serves them all.

    Per arm, the variance of its per-seed means less their item noise (MS_resid / I) estimates
    slope^2 * var; the estimate is their ratio summed over arms (each weighted by its S - 1 df), and its df
    the Satterthwaite df of that sum at the fitted variances. None with fewer than three arms of >= 2 seeds
    (the per-arm interval is used then)."""
    parts = []
    for m in runs:
        m = np.asarray(m, float)
        S, I = m.shape  # noqa: E741
        if S < 2 or I < 2:
            continue
        ms_s, _, ms_e = _mean_squares(m)
        parts.append((S - 1, ms_s / I, ms_e / I, slope(m) ** 2))
    scale = sum(k * g for k, _, _, g in parts)
    if len(parts) < 3 or scale <= 0:
        return None
    var = max(sum(k * (s2 - e) for k, s2, e, _ in parts) / scale, 0.0)
    # var(s2) = 2 f^2 / k at the fitted f = g var + e; the estimate is sum k (s2 - e) / scale, so its df is
    # 2 E^2 / var = (sum k g var)^2 / sum k f^2 (small when the item noise e dominates)
    spread = sum(k * (g * var + e) ** 2 for k, _, e, g in parts)
    df = (scale * var) ** 2 / spread if spread > 0 else np.inf
    return {"var": var, "df": float(max(df, 1e-3)), "arms": len(parts)}


def crossed_mean(m: np.ndarray, pooled: dict | None = None, slope2: float | None = None) -> dict:
    """Mean of a seeds x items matrix with a 95% CI that counts seed and item variation.

    Variance of the grand mean in the crossed layout m[s, i] = mu + a_s + b_i + e_si is
    var_a/S + var_b/I + var_e/(S I), split into a seed part (var_a/S + var_e/(S I)) and an item part
    (var_b/I) that each get their own t quantile, their half-widths added in quadrature (see below).
    The seed part is the variance of the per-seed means (MS_s/(S I), S - 1 df; where it and the item part
    are both estimated 0 on data that vary, the residual MS_e/(S I) on its own df instead). Given `pooled`
    (pooled_seed_variance of the design's arms) and this matrix's `slope2` (the squared slope its seed
    effect has on the rate scale), the seed part is slope2 * pooled var / S + MS_e/(S I) on the
    pooled df instead. With one seed: items only (flagged). A matrix whose cells are all equal gives no
    variance to estimate: flagged `degenerate`. `df` is the t df equivalent to the interval (for p-values).
    """
    m = np.asarray(m, float)
    S, I = m.shape  # noqa: E741 (the docstring's notation: S seeds, I items)
    est = float(m.mean())
    out = {"estimate": est, "seeds": S, "items": I}
    if S * I < 2:
        return {
            **out,
            "lo": np.nan,
            "hi": np.nan,
            "se": np.nan,
            "df": np.nan,
            "method": "none (one observation)",
            "degenerate": False,
        }
    if np.ptp(m) == 0:
        return {
            **out,
            "lo": est,
            "hi": est,
            "se": 0.0,
            "df": np.nan,
            "degenerate": True,
            "method": "degenerate: every seed and item gives the same value",
        }
    if S == 1 or I == 1:
        v = m.ravel()
        se, df = float(v.std(ddof=1) / np.sqrt(len(v))), len(v) - 1
        method = (
            "items only (1 seed: seed-to-seed variation not estimable)" if S == 1 else "seeds only (1 item)"
        )
        half = float(stats.t.ppf(0.975, df) * se)
        return {
            **out,
            "lo": est - half,
            "hi": est + half,
            "se": se,
            "df": float(df),
            "method": method,
            "degenerate": False,
        }
    ms_s, ms_i, ms_e = _mean_squares(m)
    noise = ms_e / (S * I)
    if pooled is not None and slope2 is not None:
        shared = slope2 * pooled["var"] / S
        v_seed = shared + noise
        # Satterthwaite df of the two parts (the pooled variance's df, the residual's (S-1)(I-1))
        spread = shared**2 / pooled["df"] + noise**2 / ((S - 1) * (I - 1))
        df_seed = v_seed**2 / spread if spread > 0 else np.inf
        method = f"crossed seeds x items, seed variance pooled over {pooled['arms']} arms"
    else:
        v_seed, df_seed = ms_s / (S * I), S - 1
        method = "crossed seeds x items"
    # Each part gets its own t quantile and the half-widths add in quadrature: a pooled Satterthwaite df
    # trusts a 1-df seed variance too much (coverage 0.87 at 2 seeds in tests/test_stats.py's designs), and
    # so does subtracting MS_e from it.
    v_item = max(ms_i - ms_e, 0.0) / (S * I)
    if v_seed == 0 and v_item == 0:
        # equal per-seed means and an item part the ANOVA puts below 0, on data that are not degenerate:
        # the residual alone, never a zero-width interval
        v_seed, df_seed = noise, (S - 1) * (I - 1)
        method += " (seed and item parts estimated 0: residual only)"
    half = float(
        np.hypot(stats.t.ppf(0.975, df_seed) * np.sqrt(v_seed), stats.t.ppf(0.975, I - 1) * np.sqrt(v_item))
    )
    se = float(np.sqrt(v_seed + v_item))
    return {
        **out,
        "lo": est - half,
        "hi": est + half,
        "se": se,
        "df": _equivalent_df(se, half),
        "method": method,
        "degenerate": False,
        "var_seed": float(v_seed),
        "var_item": float(v_item),
    }


def _equivalent_df(se: float, half: float) -> float:
    """The t degrees of freedom whose 97.5% quantile times `se` gives `half` (for p-values that match the
    CI)."""
    if se <= 0:
        return np.nan
    q = half / se
    if q <= stats.norm.ppf(0.975):
        return np.inf
    # scipy.special.stdtrit is stats.t.ppf without its argument checks (30x faster: planning calls this a lot)
    return float(brentq(lambda d: special.stdtrit(d, 0.975) - q, 0.05, 1e7))


def t_p(r: dict) -> float:
    """The two-sided t p-value of a crossed_mean result against 0 (on its interval's equivalent df)."""
    return float(2 * stats.t.sf(abs(r["estimate"] / r["se"]), r["df"])) if r.get("se", 0) > 0 else np.nan


def rate_interval(m: np.ndarray, pooled: dict | None = None) -> dict:
    """A rate (mean of 0/1 or k/n cells over seeds x items), its seed part pooled over the design's arms
    when `pooled` is given; a degenerate matrix (all 0 or all 1) falls back to a Wilson interval on the
    number of items, not on seeds x items (the seeds score the same items)."""
    r = crossed_mean(m, pooled, slope(m) ** 2)
    if r["degenerate"]:
        k = int(round(r["estimate"] * r["items"]))
        r["lo"], r["hi"] = wilson(k, r["items"])
        r["method"] = f"wilson on {r['items']} items (all seeds and items agree)"
    r["lo"], r["hi"] = max(r["lo"], 0.0), min(r["hi"], 1.0)
    return r


def difference_interval(control: np.ndarray, arm: np.ndarray, pooled: dict | None = None) -> dict:
    """Effect = mean(control - arm) over matched seeds x items, crossed interval (its seed part pooled over
    the design's arms when `pooled` is given: the control's and the arm's training runs each add their
    seed variance); t-test p-value. If every difference is equal, the interval is Newcombe's paired one on
    the first seed's items (flagged)."""
    control, arm = np.asarray(control, float), np.asarray(arm, float)
    r = crossed_mean(control - arm, pooled, slope(control) ** 2 + slope(arm) ** 2)
    if r["degenerate"] and np.isin(control, (0, 1)).all() and np.isin(arm, (0, 1)).all():
        x, y = control[0] == 1, arm[0] == 1
        r["lo"], r["hi"] = newcombe_paired(x, y)
        r["method"] = "degenerate (every difference equal): Newcombe paired on one seed's items"
        # and McNemar's exact test on those items (every item discordant the same way, or none discordant)
        r["p"] = float(
            mcnemar(
                [[int((x & y).sum()), int((x & ~y).sum())], [int((~x & y).sum()), int((~x & ~y).sum())]],
                exact=True,
            ).pvalue
        )
        return r
    r["p"] = t_p(r)
    r["lo"], r["hi"] = max(r["lo"], -1.0), min(r["hi"], 1.0)  # a difference of rates lies in [-1, 1]
    return r


def rerun_se(k: np.ndarray, n: np.ndarray) -> float:
    """The standard error a rate has from evaluation sampling alone (the same trained models and items,
    evaluated again): each cell's k of n samples adds p(1 - p)/(n - 1), unbiased for its variance p(1 - p)/n.
    nan where every cell has one sample (greedy decoding: a rerun gives the same replies)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    many = n > 1
    if not many.any():
        return float("nan")
    p = k[many] / n[many]
    return float(np.sqrt((p * (1 - p) / (n[many] - 1)).sum()) / len(n))


def seed_t_interval(per_seed: np.ndarray) -> tuple[float, float]:
    """Secondary: t-interval over the per-seed values (ignores item sampling); nan with one seed."""
    v = np.asarray(per_seed, float)
    if len(v) < 2:
        return np.nan, np.nan
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def holm(p: pd.Series) -> pd.Series:
    """Holm-adjusted p-values (family: the given series); nan stays nan."""
    ok = p.notna()
    out = pd.Series(np.nan, index=p.index)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out
