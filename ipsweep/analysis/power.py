"""Power and planning: how many prompts and eval items a sweep needs to see an effect or a correlation
(`ipsweep power`, and the power table of every analysis)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import brentq
from scipy.special import expit
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from ipsweep.analysis import inference
from ipsweep.errors import ConfigError


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


# --- planning seeds x items x arms by simulating the sweep and analysing it as `ipsweep analyze` does ---

# a run's seed effect on the logit scale when no pilot measured one: a planning guess, printed as such. The
# committed CPU sweeps (135M model, controls at the ceiling) measure 1.8-2.5 (their power.csv, seed_sd_logit)
SEED_SD = 1.0


def _mean_rate(alpha: float, sd: float) -> float:
    """E[expit(alpha + z)], z ~ N(0, sd^2) (Gauss-Hermite quadrature)."""
    z, w = np.polynomial.hermite_e.hermegauss(60)
    return float((expit(alpha + sd * z) * w).sum() / w.sum())


def logit_design(control_rate: float, effect: float, seed_sd: float, item_sd: float) -> tuple[float, float]:
    """The control's logit and the arms' logit shift that give `control_rate` and a drop of `effect` on the
    rate scale, averaged over items (sd `item_sd`) and seeds (sd `seed_sd`) on the logit scale."""
    if not 0 < control_rate < 1 or not 0 <= effect < control_rate:
        raise ConfigError(
            f"control rate {control_rate} and effect {effect}: planning needs 0 < rate < 1 and "
            "0 <= effect < rate (the effect is the drop b(control) - b(IP)); fix: --control-rate, --effect"
        )
    sd = float(np.hypot(seed_sd, item_sd))
    alpha = brentq(lambda a: _mean_rate(a, sd) - control_rate, -40, 40)
    delta = brentq(lambda d: control_rate - _mean_rate(alpha - d, sd) - effect, 0, 80) if effect else 0.0
    return alpha, delta


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values, as inference.holm (statsmodels) gives them: statsmodels' Holm runs a full
    garbage collection on every call (60 ms), which a simulation of thousands of sweeps cannot afford."""
    order = np.argsort(p)
    adjusted = np.minimum(np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))), 1.0)
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def simulate_design(
    arms: int,
    seeds: int,
    items: int,
    control_rate: float,
    effect: float,
    seed_sd: float,
    item_sd: float = 1.5,
    reps: int = 200,
    seed: int = 0,
) -> dict:
    """Simulate `reps` sweeps (a control and `arms` IP arms, each trained `seeds` times and scored 0/1 on
    the same `items`, every arm at the target `effect`) and analyse each with the effect intervals of
    `ipsweep analyze` (seed variance pooled over the arms). Returns the power per arm (the interval excludes
    0), the power after Holm over the arms (the report's family), the mean interval width and the mean
    standard error."""
    alpha, delta = logit_design(control_rate, effect, seed_sd, item_sd)
    rng = np.random.default_rng(seed)
    hits, holm_hits, widths, ses = 0, 0, [], []
    for _ in range(reps):
        b = rng.normal(0, item_sd, items)  # the eval items, shared by every arm (paired)

        def runs(shift: float, b: np.ndarray = b) -> np.ndarray:
            logits = alpha - shift + b + rng.normal(0, seed_sd, (seeds, 1))
            return (rng.random((seeds, items)) < expit(logits)).astype(float)

        control, ip = runs(0.0), [runs(delta) for _ in range(arms)]
        pooled = inference.pooled_seed_variance([control, *ip])
        cis = [inference.difference_interval(control, m, pooled) for m in ip]
        hits += sum(c["lo"] > 0 or c["hi"] < 0 for c in cis)
        holm_hits += int((_holm(np.array([c["p"] for c in cis])) < 0.05).sum())
        widths += [c["hi"] - c["lo"] for c in cis]
        ses += [c["se"] for c in cis]
    n = reps * arms
    return {
        "power": hits / n,
        "power_holm": holm_hits / n,
        "width": float(np.mean(widths)),
        "se": float(np.nanmean(ses)),
        "mc_se": float(np.sqrt(0.25 / reps)),  # at most: arms of one sweep share its control
    }


def plan(
    arms: int,
    seeds: list[int],
    items: list[int],
    control_rate: float,
    effect: float,
    seed_sd: float,
    item_sd: float = 1.5,
    reps: int = 200,
) -> pd.DataFrame:
    """simulate_design at every seeds x items, with the GPU runs each costs ((arms + 1) x seeds)."""
    rows = []
    for s in seeds:
        for i in items:
            r = simulate_design(arms, s, i, control_rate, effect, seed_sd, item_sd, reps, seed=s * 10_007 + i)
            rows.append({"seeds": s, "items": i, "runs": (arms + 1) * s, **r})
    return pd.DataFrame(rows)
