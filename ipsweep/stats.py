"""The intervals a job computes as it measures: a rate's Wilson interval (every evaluation) and a paired
difference's (elicitation). Ground floor, on numpy alone, so a job does not load the analysis (scipy,
statsmodels, pandas); the analysis (analysis/inference.py) uses these same functions.
"""

from __future__ import annotations

import numpy as np

# The standard normal's upper 2.5% point, scipy.stats.norm.isf(0.025) to the last bit (tests/test_stats.py
# checks it, and that `wilson` gives statsmodels' proportion_confint(method="wilson") bit for bit).
Z_975 = 1.9599639845400545


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n, computed as statsmodels' proportion_confint does."""
    k, n = np.asarray(k), np.asarray(n)
    q = k / n
    z2 = Z_975**2
    denom = 1 + z2 / n
    center = (q + z2 / (2 * n)) / denom
    dist = Z_975 * np.sqrt(q * (1.0 - q) / n + z2 / (4.0 * n**2))
    dist /= denom
    return float(np.clip(center - dist, 0, 1)), float(np.clip(center + dist, 0, 1))


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
    from scipy import stats  # the t quantile: only for graded outcomes (the logprob estimators)

    d = x - y
    se = float(d.std(ddof=1) / np.sqrt(n))
    half = stats.t.ppf(0.975, n - 1) * se
    return {"estimate": est, "lo": est - half, "hi": est + half, "n": n, "method": "t paired by item"}
