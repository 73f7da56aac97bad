"""The correlation of elicitation strength and inoculation effect (one point per prompt): Pearson and
Spearman with their intervals and permutation p-values, influence, errors-in-variables slopes, and the
random-effects pooling across settings. Tested by simulation in tests/test_stats.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

Z95 = stats.norm.ppf(0.975)


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
