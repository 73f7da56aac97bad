import numpy as np
import pandas as pd
import pytest

from ipsweep.analysis import analyze
from ipsweep.errors import ConfigError
from ipsweep.evaluate import rate
from ipsweep.store import Run


def _record(prompt, condition, seed, caps_k, status="done"):
    def ev(k):
        by_group = [{"metric": "caps", "eval_set": "test", "group": "arith", **rate(k // 2, 5)},
                    {"metric": "caps", "eval_set": "test", "group": "plural", **rate(k - k // 2, 5)},
                    {"metric": "correct", "eval_set": "test", "group": "arith", **rate(5, 5)}]
        return {"none": {"metrics": {"caps": rate(k, 10), "correct": rate(5, 10)}, "by_group": by_group}}
    return {"signature": f"{prompt}{seed}", "setting": "trait_pair", "prompt": prompt, "role": "inoculation",
            "condition": condition, "seed": seed, "model": "m", "sweep": "t", "headline_test_prompt": "none",
            "behaviour_metric": "caps", "capability_metric": "correct", "status": status, "error": None,
            "run_dir": f"runs/{prompt}{seed}",
            "epochs": {"0": {"evals": ev(0)}, "1": {"loss": 1.0, "evals": ev(caps_k[0])}, "2": {"loss": 0.5, "evals": ev(caps_k[1])}}}


@pytest.fixture
def sweep(tmp_path):
    for rec in [_record("none", "control", 0, (9, 10)), _record("none", "control", 1, (8, 10)),
                _record("caps", "ip", 0, (3, 5)), _record("caps", "ip", 1, (1, 6))]:
        Run(tmp_path / "runs" / rec["signature"]).save(rec)
    return tmp_path


def test_condition_table_pools_seeds(sweep):
    result = analyze(sweep)
    t = result["table"].set_index(["arm", "epoch"])
    assert t.loc[("control", 1), "behaviour_k/n"] == "17/20"
    assert t.loc[("ip:caps", 2), "behaviour"] == pytest.approx(11 / 20)
    assert t.loc[("base", 0), "behaviour_k/n"] == "0/10", "epoch 0 appears once, not once per run"
    assert t.loc[("ip:caps", 1), "seeds"] == 2


def test_effect_is_matched_on_seed_and_epoch(sweep):
    e = analyze(sweep)["effects"].set_index(["arm", "epoch"])
    # seed 0: 0.9-0.3, seed 1: 0.8-0.1 -> mean 0.65
    assert e.loc[("ip:caps", 1), "effect"] == pytest.approx(0.65)
    assert e.loc[("ip:caps", 2), "effect"] == pytest.approx(((1.0 - 0.5) + (1.0 - 0.6)) / 2)
    assert e.loc[("ip:caps", 1), "capability_cost"] == pytest.approx(0.0)


def test_outputs_written(sweep):
    result = analyze(sweep)
    out = result["out_dir"]
    for name in ["groups.csv", "tidy.csv", "tidy.parquet", "conditions.csv", "conditions.md", "effects.csv", "behaviour.png", "report.md"]:
        assert (out / name).stat().st_size > 0, name
    tidy = pd.read_parquet(out / "tidy.parquet")
    assert set(tidy.epoch) == {0, 1, 2} and len(tidy) == 4 * 3 * 2
    assert "![behaviour rate" in (out / "report.md").read_text()


def test_failed_run_is_listed_not_counted(sweep):
    rec = _record("caps", "ip", 2, (0, 0), status="failed")
    rec["error"] = {"type": "DivergedError", "message": "loss became nan"}
    rec["epochs"] = {"0": rec["epochs"]["0"]}
    Run(sweep / "runs" / "bad").save(rec)
    result = analyze(sweep)
    assert "DivergedError: loss became nan" in result["report"].read_text()
    assert result["table"].set_index(["arm", "epoch"]).loc[("ip:caps", 1), "seeds"] == 2


def test_not_a_sweep_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a sweep dir"):
        analyze(tmp_path)


def test_group_table_pools_seeds_per_group(sweep):
    g = analyze(sweep)["groups"].set_index(["arm", "epoch", "group"])
    # control seeds 0 and 1 at epoch 1: caps 9 and 8 -> arith 4+4 of 10, plural 5+4 of 10
    assert g.loc[("control", 1, "arith"), "behaviour"] == pytest.approx(0.8)
    assert g.loc[("control", 1, "plural"), "behaviour"] == pytest.approx(0.9)
    assert g.loc[("control", 1, "arith"), "capability"] == pytest.approx(1.0)
    assert g.loc[("base", 0, "arith"), "behaviour"] == 0.0


def test_scatter_with_no_spread_in_elicitation(sweep):
    # A small model can ignore every prompt before training: all sampled elicitations are 0.
    for i, prompt in enumerate(["a", "b", "c"]):
        rec = _record(prompt, "ip", 0, (i, i))
        rec["elicitation"] = {"sampled": {"estimate": 0.0, "lo": -0.1, "hi": 0.1},
                              "logprob": {"estimate": 0.1 * i, "lo": 0.0, "hi": 0.3}}
        Run(sweep / "runs" / f"{prompt}").save(rec)
    result = analyze(sweep)
    assert {"scatter_sampled", "scatter_logprob"} <= set(result["plots"])
    c = result["correlations"].query("epoch == 1").set_index("estimator")
    assert np.isnan(c.loc["sampled", "pearson"]) and c.loc["logprob", "points"] == 3


def test_two_sweep_dirs_are_pooled_across_settings(tmp_path, sweep):
    other = tmp_path / "other"
    for i, prompt in enumerate(["a", "b", "c", "d"]):
        for dir_, setting in ((sweep, "trait_pair"), (other, "gcd_sycophancy")):
            rec = _record(prompt, "ip", 0, (6 - i, 6 - i))
            rec["setting"] = setting
            rec["elicitation"] = {"logprob": {"estimate": 0.1 * i, "lo": 0.0, "hi": 0.5},
                                  # the small model ignores every prompt in one setting: no ranking there
                                  "sampled": {"estimate": 0.0 if setting == "trait_pair" else 0.2 * i, "lo": 0, "hi": 1}}
            Run(dir_ / "runs" / f"{setting}-{prompt}").save(rec)
    control = _record("none", "control", 0, (9, 10))
    control["setting"] = "gcd_sycophancy"
    Run(other / "runs" / "control").save(control)
    with pytest.raises(ConfigError, match="fix: add --out"):
        analyze([sweep, other])
    result = analyze([sweep, other], tmp_path / "pooled")
    c = result["correlations"].query("epoch == 1 and estimator == 'logprob'").set_index("setting")
    assert set(c.index) == {"trait_pair", "gcd_sycophancy", "pooled (z within setting)"}
    assert c.loc["pooled (z within setting)", "points"] == 8
    s = result["correlations"].query("epoch == 1 and estimator == 'sampled'").set_index("setting")
    assert s.loc["pooled (z within setting)", "pooled_settings"] == "gcd_sycophancy"
    assert s.loc["pooled (z within setting)", "points"] == 4
    assert (tmp_path / "pooled" / "report.md").is_file()
