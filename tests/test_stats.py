"""ipsweep.analysis.inference against closed forms, and its intervals' coverage by simulation at the
designs people run.

Each coverage test reports the measured coverage in its message. Fixed seeds: the numbers are reproducible.
"""

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit

from ipsweep.analysis import inference, power

# (intercept, IP shift, item spread, seed spread) on the logit scale: a strong and a weak effect, items that
# differ a lot or little, seeds that matter a lot (like the README demo: per-seed effects 0.35 and 0.20) or
# little.
REGIMES = {
    "typical": (1.5, 1.0, 1.5, 0.5),
    "seed-heavy": (2.5, 1.5, 1.0, 1.0),
    "item-heavy": (0.5, 0.5, 2.0, 0.3),
    "small effect": (3.0, 0.8, 1.0, 0.2),
}


def _true_effect(rng, alpha, delta, ti, ts, n=400_000):
    b = rng.normal(0, ti, n)
    return float(
        (expit(alpha + b + rng.normal(0, ts, n)) - expit(alpha - delta + b + rng.normal(0, ts, n))).mean()
    )


def _coverage(regime, seeds, items, reps=800):
    alpha, delta, ti, ts = REGIMES[regime]
    rng = np.random.default_rng(seeds * 1000 + items)
    truth = _true_effect(rng, *REGIMES[regime])
    hits = 0
    for _ in range(reps):
        b = rng.normal(0, ti, items)  # the eval items drawn, shared by control and arm (paired)
        control = rng.random((seeds, items)) < expit(alpha + b + rng.normal(0, ts, (seeds, 1)))
        arm = rng.random((seeds, items)) < expit(alpha - delta + b + rng.normal(0, ts, (seeds, 1)))
        r = inference.difference_interval(control.astype(float), arm.astype(float))
        hits += r["lo"] <= truth <= r["hi"]
    return hits / reps


# 20 items with 2 seeds is below what the interval serves at 95% (measured 0.90-0.96 across these regimes;
# docs/statistics.md): tested from 40 items at 2 seeds, from 20 at 3 and 5.
@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_effect_interval_covers_the_true_effect(seeds):
    """Every regime at 20-120 items (40-120 at 2 seeds). 800 replicates a cell (Monte Carlo SE 0.8 points):
    the mean over cells must be 93-97%, and no cell below 91% (a real miscalibration shows as 86-88%)."""
    items = (40, 60, 120) if seeds == 2 else (20, 40, 60, 120)
    cov = {(reg, i): _coverage(reg, seeds, i) for reg in REGIMES for i in items}
    msg = f"effect CI coverage at {seeds} seeds: " + ", ".join(
        f"{r} {i} items {c:.3f}" for (r, i), c in cov.items()
    )
    assert 0.93 <= np.mean(list(cov.values())) <= 0.97, msg
    assert min(cov.values()) >= 0.91 and max(cov.values()) <= 0.985, msg


@pytest.mark.parametrize("rho", [0.0, 0.57, 0.8])
@pytest.mark.parametrize("prompts", [8, 11])
@pytest.mark.parametrize("seeds", [1, 3])
def test_correlation_interval_covers_at_small_designs(rho, prompts, seeds):
    """Prompts with elicitation x (measured with error) and expected effect mu; each seed's effect is mu plus
    training noise, minus the seed's control (shared by every prompt of that seed). The target is the
    correlation of what is measured: x with error vs the mean effect over the seeds run."""
    rng = np.random.default_rng(int(rho * 100) + prompts * 10 + seeds)
    sd_mu, sd_seed, x_err = 0.15, 0.12, 0.1
    # the arm's own training noise (variance sd_seed^2 / 2 per seed) varies across prompts; the control's is
    # shared
    truth = rho * np.sqrt(sd_mu**2 / (sd_mu**2 + sd_seed**2 / (2 * seeds))) / np.sqrt(1 + x_err)
    hits, reps = 0, 1500
    for _ in range(reps):
        x = rng.normal(0, 1, prompts)
        mu = sd_mu * (rho * x + np.sqrt(1 - rho**2) * rng.normal(0, 1, prompts))
        control = rng.normal(0, sd_seed / np.sqrt(2), seeds)
        y = (mu[:, None] + rng.normal(0, sd_seed / np.sqrt(2), (prompts, seeds)) - control).mean(1)
        r = sps.pearsonr(x + rng.normal(0, np.sqrt(x_err), prompts), y).statistic
        lo, hi = inference.fisher_ci(r, prompts)
        hits += lo <= truth <= hi
    assert 0.93 <= hits / reps <= 0.97, (
        f"correlation CI coverage {hits / reps:.3f} (rho {rho}, {prompts} prompts, {seeds} seeds)"
    )


def test_paired_elicitation_interval_covers():
    """With and without the prompt on the same 60 items (correlated outcomes): Newcombe's paired interval."""
    rng = np.random.default_rng(3)
    p_without, lift = 0.2, 0.15
    hits, reps = 0, 2000
    for _ in range(reps):
        base = rng.random(60) < p_without
        up = rng.random(60) < lift / (1 - p_without)  # the prompt turns some "no" items into "yes"
        down = rng.random(60) < 0.05  # and a few "yes" into "no"
        with_prompt = np.where(base, ~down, up)
        truth = (1 - p_without) * lift / (1 - p_without) - p_without * 0.05
        r = inference.paired_difference(with_prompt.astype(float), base.astype(float))
        hits += r["lo"] <= truth <= r["hi"]
    assert 0.93 <= hits / reps <= 0.97, f"paired CI coverage {hits / reps:.3f}"


def test_paired_interval_is_narrower_than_the_independent_one_when_items_agree():
    from statsmodels.stats.proportion import confint_proportions_2indep

    x = np.r_[np.ones(20), np.zeros(40)]
    y = np.r_[np.ones(14), np.zeros(46)]  # the prompt adds 6 items, takes none away
    r = inference.paired_difference(x, y)
    lo, hi = confint_proportions_2indep(20, 60, 14, 60, method="newcomb", compare="diff")
    assert r["method"] == "newcombe paired" and r["estimate"] == pytest.approx(0.1)
    assert r["hi"] - r["lo"] < hi - lo and r["lo"] > 0 > lo


def test_one_seed_is_items_only_and_equals_a_t_interval():
    m = np.random.default_rng(0).random((1, 30)).round()
    r = inference.crossed_mean(m)
    lo, hi = sps.t.interval(0.95, 29, loc=m.mean(), scale=sps.sem(m.ravel()))
    assert r["method"].startswith("items only (1 seed") and (r["lo"], r["hi"]) == pytest.approx((lo, hi))


def test_degenerate_data_are_flagged_and_rates_never_zero_width():
    r = inference.difference_interval(np.ones((2, 40)), np.zeros((2, 40)))
    assert r["estimate"] == 1 and "degenerate" in r["method"] and r["lo"] < 1 - 0.05
    assert r["p"] == pytest.approx(2 * 0.5**40)  # McNemar exact: 40 of 40 items go one way
    assert inference.difference_interval(np.ones((2, 40)), np.ones((2, 40)))["p"] == 1.0
    rate = inference.rate_interval(np.ones((3, 40)))
    assert (
        rate["hi"] == 1
        and rate["lo"] == pytest.approx(inference.wilson(40, 40)[0])
        and "wilson on 40 items" in rate["method"]
    )


def test_power_matches_the_closed_forms():
    assert power.points_needed(0.57) == 22
    assert power.correlation_power(0.57, 8) == pytest.approx(0.30, abs=0.01)
    assert power.items_needed(0.85, 0.22) == 60
    assert power.smallest_effect(0.85, 60) == pytest.approx(0.22, abs=0.005)
    smallest = power.smallest_correlation(11)
    assert power.correlation_power(smallest, 11) == pytest.approx(0.80, abs=1e-6)


def test_deming_slope_is_ols_when_x_is_exact_and_steeper_when_x_is_noisy():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, 200)
    y = 2 * x + rng.normal(0, 0.5, 200)
    ols = sps.linregress(x, y).slope
    assert inference.deming_slope(x, y, 1e9) == pytest.approx(ols, rel=1e-4)
    xn = x + rng.normal(0, 0.7, 200)  # elicitation measured with error attenuates OLS; Deming undoes it
    s = inference.slopes(xn, y, np.full(200, 0.7), np.full(200, 0.5))
    assert s["slope_ols"] < 1.6 and s["slope_eiv"] == pytest.approx(2.0, abs=0.25)


def test_meta_analysis_of_equal_correlations_is_that_correlation():
    m = inference.meta_correlation([0.5, 0.5, 0.5], [11, 11, 11])
    assert m["pearson"] == pytest.approx(0.5) and m["tau2"] == 0
    lo, hi = inference.fisher_ci(0.5, 3 * 8 + 3)  # fixed-effect with three settings' information
    assert (m["pearson_lo"], m["pearson_hi"]) == pytest.approx((lo, hi))
    assert inference.meta_correlation([0.9, -0.9], [11, 11])["tau2"] > 0


def test_influence_finds_the_point_that_carries_r():
    x = np.r_[np.zeros(7) + np.arange(7) * 0.01, 1.0]
    y = np.r_[np.random.default_rng(5).normal(0, 0.05, 7), 1.0]
    infl = inference.influence(x, y, [f"p{i}" for i in range(8)]).set_index("prompt")
    assert infl.cooks_d.idxmax() == "p7" and infl.loc["p7", "cooks_d"] > 1
    assert abs(infl.loc["p7", "r_without"]) < sps.pearsonr(x, y).statistic


def test_holm_matches_statsmodels():
    import pandas as pd
    from statsmodels.stats.multitest import multipletests

    p = pd.Series([0.01, 0.04, np.nan, 0.03])
    out = inference.holm(p)
    assert np.isnan(out[2]) and list(out.dropna()) == pytest.approx(
        multipletests([0.01, 0.04, 0.03], method="holm")[1]
    )
