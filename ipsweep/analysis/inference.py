"""The statistics of an IP sweep: pure functions on arrays and tidy tables (no file reading, no plots).

Design (see docs/statistics.md): every evaluation scores the same eval items in every run, seed, epoch
and test prompt, so comparisons are paired by item, and a rate or an effect is a mean over a
seeds x items matrix. Its interval counts both sources of variation, seed-to-seed (training randomness)
and item-to-item (which questions were drawn), through the variance components of a crossed two-way
layout; with one seed only the item part can be estimated, and the result says so.
Tested against closed forms and by simulation (tests/test_stats.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

Z95 = stats.norm.ppf(0.975)


def wilson(k: int, n: int) -> tuple[float, float]:
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    return float(lo), float(hi)


def newcombe_paired(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """95% CI for P(x) - P(y) from paired binary outcomes (Newcombe 1998, method 10: Wilson score
    intervals of the two margins, combined with the phi correlation of the pairs)."""
    x, y = np.asarray(x, bool), np.asarray(y, bool)
    n = len(x)
    a, b, c, d = (int(v) for v in ((x & y).sum(), (x & ~y).sum(), (~x & y).sum(), (~x & ~y).sum()))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n)
    l2, u2 = wilson(a + c, n)
    denom = np.sqrt(float((a + b) * (c + d) * (a + c) * (b + d)))
    phi = (a * d - b * c) / denom if denom > 0 else 0.0
    theta = p1 - p2
    lo = theta - np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = theta + np.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return float(max(lo, -1.0)), float(min(hi, 1.0))


def paired_difference(with_prompt: np.ndarray, without: np.ndarray) -> dict:
    """Mean of with - without over items scored both ways (e.g. sampled elicitation), 95% CI paired by item:
    Newcombe's paired interval for one binary outcome per item, else a t-interval on the item differences."""
    x, y = np.asarray(with_prompt, float), np.asarray(without, float)
    n = len(x)
    est = float((x - y).mean()) if n else float("nan")
    if n < 2:
        return {
            "estimate": est,
            "lo": float("nan"),
            "hi": float("nan"),
            "n": n,
            "method": "none (fewer than 2 items)",
        }
    if np.isin(x, (0, 1)).all() and np.isin(y, (0, 1)).all():
        lo, hi = newcombe_paired(x == 1, y == 1)
        return {"estimate": est, "lo": lo, "hi": hi, "n": n, "method": "newcombe paired"}
    d = x - y
    se = float(d.std(ddof=1) / np.sqrt(n))
    half = stats.t.ppf(0.975, n - 1) * se
    return {"estimate": est, "lo": est - half, "hi": est + half, "n": n, "method": "t paired by item"}


def crossed_mean(m: np.ndarray) -> dict:
    """Mean of a seeds x items matrix with a 95% CI that counts seed and item variation.

    Variance of the grand mean in the crossed layout m[s, i] = mu + a_s + b_i + e_si is
    var_a/S + var_b/I + var_e/(S I), estimated without bias by (MS_seeds + MS_items - MS_resid)/(S I)
    (ANOVA mean squares), split into a seed part and an item part that each get their own t quantile
    (see below). With one seed: items only (flagged). A matrix whose cells are all equal gives no
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
    else:
        seed_means, item_means = m.mean(1), m.mean(0)
        ms_s = I * ((seed_means - est) ** 2).sum() / (S - 1)
        ms_i = S * ((item_means - est) ** 2).sum() / (I - 1)
        resid = m - seed_means[:, None] - item_means[None, :] + est
        ms_e = (resid**2).sum() / ((S - 1) * (I - 1))
        # var(mean) = [var_a/S + var_e/(S I)] + var_b/I: the seed part (the variance of the per-seed means,
        # MS_s/(S I), on S-1 df) and the item part ((MS_i - MS_e)/(S I), on I-1 df). Each part gets its own t
        # quantile and the half-widths add in quadrature: a pooled Satterthwaite df trusts a 1-df seed
        # variance too much (coverage 0.87 at 2 seeds in tests/test_stats.py's designs), and so does
        # subtracting MS_e from it.
        v_seed, v_item = ms_s / (S * I), max(ms_i - ms_e, 0.0) / (S * I)
        half = float(
            np.hypot(stats.t.ppf(0.975, S - 1) * np.sqrt(v_seed), stats.t.ppf(0.975, I - 1) * np.sqrt(v_item))
        )
        se = float(np.sqrt(v_seed + v_item))

        return {
            **out,
            "lo": est - half,
            "hi": est + half,
            "se": se,
            "df": _equivalent_df(se, half),
            "method": "crossed seeds x items",
            "degenerate": False,
            "var_seed": float(v_seed),
            "var_item": float(v_item),
        }
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


def _equivalent_df(se: float, half: float) -> float:
    """The t degrees of freedom whose 97.5% quantile times `se` gives `half` (for p-values that match the
    CI)."""
    if se <= 0:
        return np.nan
    q = half / se
    if q <= stats.norm.ppf(0.975):
        return np.inf
    from scipy.optimize import brentq

    return float(brentq(lambda d: stats.t.ppf(0.975, d) - q, 0.05, 1e7))


def rate_interval(m: np.ndarray) -> dict:
    """A rate (mean of 0/1 or k/n cells over seeds x items); a degenerate matrix (all 0 or all 1) falls back
    to a Wilson interval on the number of items, not on seeds x items (the seeds score the same items)."""
    r = crossed_mean(m)
    if r["degenerate"]:
        k = int(round(r["estimate"] * r["items"]))
        r["lo"], r["hi"] = wilson(k, r["items"])
        r["method"] = f"wilson on {r['items']} items (all seeds and items agree)"
    r["lo"], r["hi"] = max(r["lo"], 0.0), min(r["hi"], 1.0)
    return r


def difference_interval(control: np.ndarray, arm: np.ndarray) -> dict:
    """Effect = mean(control - arm) over matched seeds x items, crossed interval; t-test p-value.
    If every difference is equal, the interval is Newcombe's paired one on the first seed's items
    (flagged)."""
    control, arm = np.asarray(control, float), np.asarray(arm, float)
    r = crossed_mean(control - arm)
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
    r["p"] = float(2 * stats.t.sf(abs(r["estimate"] / r["se"]), r["df"])) if r.get("se", 0) > 0 else np.nan
    r["lo"], r["hi"] = max(r["lo"], -1.0), min(r["hi"], 1.0)  # a difference of rates lies in [-1, 1]
    return r


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


# --- correlation of elicitation and effect (one point per prompt) ---


def fisher_ci(r: float, n: int) -> tuple[float, float]:
    if n < 4 or not np.isfinite(r):
        return np.nan, np.nan
    z, se = np.arctanh(np.clip(r, -0.999999, 0.999999)), 1 / np.sqrt(n - 3)
    return float(np.tanh(z - Z95 * se)), float(np.tanh(z + Z95 * se))


def spearman_ci(rho: float, n: int) -> tuple[float, float]:
    """Fisher z with the Bonett-Wright standard error sqrt((1 + rho^2/2)/(n - 3))."""
    if n < 4 or not np.isfinite(rho):
        return np.nan, np.nan
    z, se = np.arctanh(np.clip(rho, -0.999999, 0.999999)), np.sqrt((1 + rho**2 / 2) / (n - 3))
    return float(np.tanh(z - Z95 * se)), float(np.tanh(z + Z95 * se))


def correlation(x, y, n_permutations: int = 9999, seed: int = 0) -> dict:
    """Pearson (Fisher-z 95% CI) and Spearman (Bonett-Wright CI), each with a two-sided permutation
    p-value."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    nan = {
        k: np.nan
        for k in (
            "pearson",
            "pearson_lo",
            "pearson_hi",
            "pearson_p",
            "spearman",
            "spearman_lo",
            "spearman_hi",
            "spearman_p",
        )
    }
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"points": n, **nan}
    out = {"points": n}
    for name, fn, ci in (
        ("pearson", lambda a, b: stats.pearsonr(a, b).statistic, fisher_ci),
        ("spearman", lambda a, b: stats.spearmanr(a, b).statistic, spearman_ci),
    ):
        r = float(fn(x, y))
        perm = stats.permutation_test(
            (x, y),
            fn,
            permutation_type="pairings",
            n_resamples=n_permutations,
            alternative="two-sided",
            random_state=np.random.default_rng(seed),
        )
        lo, hi = ci(r, n)
        out.update({name: r, f"{name}_lo": lo, f"{name}_hi": hi, f"{name}_p": float(perm.pvalue)})
    return out


def influence(x, y, labels) -> pd.DataFrame:
    """Leave-one-prompt-out: Pearson r without each point, its leverage and Cook's distance (OLS y ~ x)."""
    import statsmodels.api as sm

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 4 or np.ptp(x) == 0:
        return pd.DataFrame()
    infl = sm.OLS(y, sm.add_constant(x)).fit().get_influence()
    rows = []
    for i, label in enumerate(labels):
        keep = np.arange(len(x)) != i
        r = (
            stats.pearsonr(x[keep], y[keep]).statistic
            if np.ptp(x[keep]) > 0 and np.ptp(y[keep]) > 0
            else np.nan
        )
        rows.append(
            {
                "prompt": label,
                "r_without": float(r),
                "leverage": float(infl.hat_matrix_diag[i]),
                "cooks_d": float(infl.cooks_distance[0][i]),
            }
        )
    return pd.DataFrame(rows)


def deming_slope(x, y, error_ratio: float) -> float:
    """Deming regression slope; `error_ratio` = var(error in y) / var(error in x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    sxx, syy = x.var(ddof=1), y.var(ddof=1)
    sxy = np.cov(x, y)[0, 1]
    if sxy == 0:
        return 0.0
    d = syy - error_ratio * sxx
    return float((d + np.sqrt(d**2 + 4 * error_ratio * sxy**2)) / (2 * sxy))


def slopes(x, y, sx, sy) -> dict:
    """Effect per unit of elicitation: the OLS slope (elicitation taken as exact) and the errors-in-variables
    Deming slope, whose error-variance ratio comes from the points' own standard errors (mean sy^2 / mean
    sx^2); its standard error by jackknife over prompts."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    nan = {"slope_ols": np.nan, "slope_ols_se": np.nan, "slope_eiv": np.nan, "slope_eiv_se": np.nan}
    if len(x) < 3 or np.ptp(x) == 0:
        return nan
    fit = stats.linregress(x, y)
    out = {**nan, "slope_ols": float(fit.slope), "slope_ols_se": float(fit.stderr)}
    sx, sy = np.asarray(sx, float), np.asarray(sy, float)
    if np.all(np.isfinite(sx)) and np.all(np.isfinite(sy)) and np.mean(sx**2) > 0:
        ratio = float(np.mean(sy**2) / np.mean(sx**2))
        out["slope_eiv"] = deming_slope(x, y, ratio)
        n = len(x)
        if n >= 4:
            jack = np.array([deming_slope(np.delete(x, i), np.delete(y, i), ratio) for i in range(n)])
            out["slope_eiv_se"] = float(np.sqrt((n - 1) / n * ((jack - jack.mean()) ** 2).sum()))
    return out


def meta_correlation(rs, ns) -> dict:
    """Pool per-setting correlations as a DerSimonian-Laird random-effects meta-analysis of Fisher z
    (each setting weighted by 1 / (1/(n - 3) + tau^2)). Written out because statsmodels' combine_effects
    (0.14) leaves the DL tau^2 negative with two studies instead of truncating it at 0."""
    rs, ns = np.asarray(rs, float), np.asarray(ns, float)
    ok = np.isfinite(rs) & (ns >= 4)
    k = int(ok.sum())
    if k < 2:
        return {
            "pearson": np.nan,
            "pearson_lo": np.nan,
            "pearson_hi": np.nan,
            "tau2": np.nan,
            "i2": np.nan,
            "settings": k,
        }
    z, v = np.arctanh(np.clip(rs[ok], -0.999999, 0.999999)), 1 / (ns[ok] - 3)
    w = 1 / v
    z_fixed = (w * z).sum() / w.sum()
    q = (w * (z - z_fixed) ** 2).sum()
    tau2 = max(0.0, (q - (k - 1)) / (w.sum() - (w**2).sum() / w.sum()))
    w_re = 1 / (v + tau2)
    z_re, se = (w_re * z).sum() / w_re.sum(), 1 / np.sqrt(w_re.sum())
    return {
        "pearson": float(np.tanh(z_re)),
        "pearson_lo": float(np.tanh(z_re - Z95 * se)),
        "pearson_hi": float(np.tanh(z_re + Z95 * se)),
        "tau2": float(tau2),
        "i2": float(max(0.0, (q - (k - 1)) / q)) if q > 0 else 0.0,
        "settings": k,
    }
