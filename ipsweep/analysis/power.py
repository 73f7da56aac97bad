"""Power and planning: how many prompts and eval items a sweep needs to see an effect or a correlation
(`ipsweep power`, and the power table of every analysis)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize


def correlation_power(r: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided test of rho = 0 with n points (Fisher z)."""
    if n < 4:
        return np.nan
    z = abs(np.arctanh(r)) * np.sqrt(n - 3)
    c = stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.sf(c - z) + stats.norm.cdf(-c - z))


def points_needed(r: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Prompts needed to detect a correlation r (Fisher z)."""
    need = ((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / np.arctanh(abs(r))) ** 2 + 3
    return int(np.ceil(need))


def smallest_correlation(n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    if n < 4:
        return np.nan
    return float(np.tanh((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / np.sqrt(n - 3)))


def items_needed(control_rate: float, effect: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Eval items per arm to detect b(control) - b(arm) = effect (two proportions, arcsine effect size; one
    seed; seed-to-seed variation needs more)."""
    h = proportion_effectsize(control_rate, control_rate - effect)
    return int(np.ceil(NormalIndPower().solve_power(effect_size=abs(h), alpha=alpha, power=power, ratio=1.0)))


def smallest_effect(control_rate: float, items: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest drop from control_rate detectable with `items` per arm (same assumptions as
    items_needed)."""
    h = NormalIndPower().solve_power(nobs1=items, alpha=alpha, power=power, ratio=1.0)
    # invert Cohen's h = 2 asin(sqrt(p1)) - 2 asin(sqrt(p2)) for p2 below p1
    p2 = np.sin(max(2 * np.arcsin(np.sqrt(control_rate)) - h, 0) / 2) ** 2
    return float(control_rate - p2)


def detectable(se: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest effect a two-sided test at `alpha` detects with `power` when the effect is estimated
    with standard error `se` (normal approximation)."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se) if se == se else np.nan
