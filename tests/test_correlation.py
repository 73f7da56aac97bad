"""The elicitation-vs-effect statistics on synthetic data with a known correlation."""

import numpy as np
import pandas as pd
import pytest

from ipsweep.analysis import correlation_table, hierarchical_bootstrap


def _points(rng, b, P=20, S=3, sp=0.5, ss=0.6):
    x, u = rng.normal(0, 1, P), rng.normal(0, sp, P)
    return [(x[j], b * x[j] + u[j] + rng.normal(0, ss, S)) for j in range(P)]


@pytest.mark.parametrize("b", [0.0, 0.6])
def test_bootstrap_interval_coverage_is_close_to_nominal(b):
    # Population correlation of x with the prompt's mean effect over S seeds.
    rho = b / np.sqrt(b**2 + 0.5**2 + 0.6**2 / 3)
    rng = np.random.default_rng(0)
    reps = 200
    hits = sum(
        (r := hierarchical_bootstrap([_points(rng, b)], n_resamples=1000, seed=i))["pearson_lo"] <= rho <= r["pearson_hi"]
        for i in range(reps)
    )
    # Resampling both prompts and seeds is slightly conservative (measured: 0.95-0.98); far from 0.95 is a bug.
    assert 0.90 <= hits / reps <= 0.995


def test_point_estimates_are_scipys():
    from scipy import stats

    pts = _points(np.random.default_rng(1), 0.6)
    r = hierarchical_bootstrap([pts], n_resamples=200)
    x, y = [p[0] for p in pts], [p[1].mean() for p in pts]
    assert r["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert r["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert r["pearson_lo"] < r["pearson"] < r["pearson_hi"]


def _effects(setting, scale, shift, rng, prompts=8, seeds=3):
    rows = []
    for j in range(prompts):
        x = rng.normal()
        for s in range(seeds):
            rows.append({"setting": setting, "prompt": f"p{j}", "arm": f"ip:p{j}", "condition": "ip", "seed": s,
                         "epoch": 1, "elicit_sampled": x * scale + shift, "elicit_logprob": np.nan,
                         "effect": (0.8 * x + rng.normal(0, 0.2)) * scale + shift})
    return rows


def test_pooling_standardises_within_setting():
    rng = np.random.default_rng(2)
    # Two settings on very different scales, each with a strong within-setting relation.
    df = pd.DataFrame(_effects("a", 1.0, 0.0, rng) + _effects("b", 0.01, 5.0, rng))
    df = pd.concat([df, df.iloc[:3].assign(condition="ptst", prompt="safe", arm="ptst:safe", elicit_sampled=-9, effect=9)])
    t = correlation_table(df, n_resamples=300).set_index("setting")
    assert list(t.estimator.unique()) == ["sampled"], "an estimator with no values gives no rows"
    assert t.loc["a", "pearson"] > 0.8 and t.loc["b", "pearson"] > 0.8
    assert t.loc["pooled (z within setting)", "pearson"] > 0.8
    assert t.loc["pooled (z within setting)", "points"] == 16, "PTST arms are not points"
