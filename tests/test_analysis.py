"""The analysis on synthetic run records with per-item outcomes: pooling, matching, PTST, outputs."""

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import wandb_offline_runs

from ipsweep import plan
from ipsweep.analysis import analyze
from ipsweep.errors import ConfigError
from ipsweep.evaluate import rate
from ipsweep.record import Record
from ipsweep.store import Run
from ipsweep.validate import check_values

ITEMS = [f"q{i}" for i in range(10)]


def _ev(k: int, correct: int = 5) -> dict:
    """An evaluation of 10 items: the first k show the behaviour, the first `correct` are correct."""
    items = [
        {
            "id": q,
            "eval_set": "test",
            "group": "arith" if i % 2 == 0 else "plural",
            "caps": [int(i < k), 1],
            "correct": [int(i < correct), 1],
        }
        for i, q in enumerate(ITEMS)
    ]
    by_group = [
        {
            "metric": "caps",
            "eval_set": "test",
            "group": g,
            **rate(sum(it["caps"][0] for it in items if it["group"] == g), 5),
        }
        for g in ("arith", "plural")
    ]
    return {
        "metrics": {"caps": rate(k, 10), "correct": rate(correct, 10)},
        "by_group": by_group,
        "items": items,
    }


def _record(prompt, condition, seed, caps_k, status="done", model="m", ptst_k=None):
    role = "none" if condition == "control" else "inoculation"
    record = {
        "signature": f"{prompt}{seed}{model}",
        "setting": "trait_pair",
        "prompt": prompt,
        "role": role,
        "condition": condition,
        "seed": seed,
        "model": model,
        "sweep": "t",
        "behaviour_metric": "caps",
        "capability_metric": "correct",
        "status": status,
        "error": None,
        "run_dir": f"runs/{prompt}{seed}{model}",
        "test_prompt_roles": {"none": "none"},
        "config": {"model": {"name": model}, "train": {"seed": seed, "lr": 1e-4}, "prompt": {"name": prompt}},
        "epochs": {
            "0": {"evals": {"none": _ev(0)}},
            "1": {"loss": 1.0, "evals": {"none": _ev(caps_k[0])}},
            "2": {"loss": 0.5, "evals": {"none": _ev(caps_k[1])}},
        },
    }
    if ptst_k is not None:  # the control also tested with the safety prompt: the PTST arm
        record["test_prompt_roles"]["safety"] = "safety"
        for e, k in zip(("0", "1", "2"), (0, *ptst_k)):
            record["epochs"][e]["evals"]["safety"] = _ev(k)
    return record


def _save(root, rec, name=None):
    Run(root / "runs" / (name or rec["signature"])).save(Record.model_validate(rec))


@pytest.fixture
def sweep(tmp_path):
    for rec in [
        _record("none", "control", 0, (9, 10)),
        _record("none", "control", 1, (8, 10)),
        _record("caps", "ip", 0, (3, 5)),
        _record("caps", "ip", 1, (1, 6)),
    ]:
        _save(tmp_path, rec)
    return tmp_path


def test_condition_table_pools_seeds_with_an_interval_over_seeds_and_items(sweep):
    t = analyze(sweep, n_permutations=99).tables["conditions"].set_index(["arm", "epoch"])
    assert t.loc[("control", 1), "behaviour_k/n"] == "17/20"
    assert t.loc[("ip:caps", 2), "behaviour"] == pytest.approx(11 / 20)
    assert t.loc[("base", 0), "behaviour_k/n"] == "0/10", "epoch 0 appears once, not once per run"
    assert t.loc[("ip:caps", 1), "seeds"] == 2 and t.loc[("ip:caps", 1), "behaviour_items"] == 10
    # 10 items scored twice are not 20 independent trials: wider than Wilson on 20
    lo, hi = t.loc[("ip:caps", 2), ["behaviour_lo", "behaviour_hi"]]
    wl, wh = rate(11, 20)["lo"], rate(11, 20)["hi"]
    assert hi - lo > wh - wl
    # all-zero base: Wilson on the 10 items, never a zero-width interval
    assert t.loc[("base", 0), "behaviour_hi"] == pytest.approx(rate(0, 10)["hi"])


def test_effect_is_paired_by_seed_and_item_with_calibrated_columns(sweep):
    e = analyze(sweep, n_permutations=99).tables["effects"].set_index(["arm", "epoch"])
    # seed 0: 0.9-0.3, seed 1: 0.8-0.1 -> mean 0.65
    assert e.loc[("ip:caps", 1), "effect"] == pytest.approx(0.65)
    assert e.loc[("ip:caps", 2), "effect"] == pytest.approx(((1.0 - 0.5) + (1.0 - 0.6)) / 2)
    assert e.loc[("ip:caps", 1), "capability_cost"] == pytest.approx(0.0)
    row = e.loc[("ip:caps", 1)]
    assert row.effect_lo < 0.65 < row.effect_hi and row.effect_hi - row.effect_lo > 0.05
    assert row.effect_method == "crossed seeds x items" and row["items"] == 10
    assert (row.effect_lo > 0) == (row.effect_p < 0.05), "the p-value agrees with the interval"
    assert row.effect_seed_ci.startswith("[")


def test_controls_are_matched_by_identity_not_by_seed(tmp_path):
    # Two sweeps analysed together: control A 10/10, control B 2/10 (another model), IP on A 3/10.
    _save(tmp_path, _record("none", "control", 0, (10, 10), model="A"))
    _save(tmp_path, _record("none", "control", 0, (2, 2), model="B"))
    _save(tmp_path, _record("caps", "ip", 0, (3, 3), model="A"))
    e = analyze(tmp_path, n_permutations=99).tables["effects"]
    assert e.set_index(["arm", "epoch"]).loc[("ip:caps", 1), "effect"] == pytest.approx(0.70)


def test_two_controls_for_one_arm_is_an_error_naming_both(sweep):
    dup = _record("none", "control", 0, (9, 10))
    dup["run_dir"] = "elsewhere/none0m"
    _save(sweep, dup, name="copy")
    with pytest.raises(
        ConfigError, match="two control runs match the same arms: elsewhere/none0m and runs/none0m"
    ):
        analyze(sweep)


def test_ptst_effect_is_control_without_minus_with_its_safety_prompt(tmp_path):
    for seed, (k, ptst) in enumerate([((9, 10), (2, 4)), ((8, 10), (3, 5))]):
        _save(tmp_path, _record("none", "control", seed, k, ptst_k=ptst))
    result = analyze(tmp_path, n_permutations=99)
    e = result.tables["effects"].set_index(["arm", "epoch"])
    assert e.loc[("ptst:safety", 1), "effect"] == pytest.approx(((0.9 - 0.2) + (0.8 - 0.3)) / 2)
    assert e.loc[("ptst:safety", 1), "condition"] == "ptst"
    t = result.tables["conditions"].set_index(["arm", "epoch"])
    assert t.loc[("ptst:safety", 2), "behaviour"] == pytest.approx(0.45)


def test_outputs_written(sweep):
    result = analyze(sweep, n_permutations=99)
    out = result.out_dir
    for name in [
        "groups.csv",
        "tidy.csv",
        "items.csv",
        "items.parquet",
        "conditions.csv",
        "conditions.md",
        "effects.csv",
        "effects_per_seed.csv",
        "power.csv",
        "behaviour.png",
        "report.md",
    ]:
        assert (out / name).stat().st_size > 0, name
    its = pd.read_parquet(out / "items.parquet")
    assert set(its.epoch) == {0, 1, 2} and len(its) == 4 * 3 * 2 * 10
    report = (out / "report.md").read_text()
    assert "![behaviour rate" in report and "## Power of this design" in report


def test_records_without_items_are_refused_with_the_fix(tmp_path):
    rec = _record("none", "control", 0, (9, 10))
    for e in rec["epochs"].values():
        del e["evals"]["none"]["items"]
    _save(tmp_path, rec)
    with pytest.raises(ConfigError, match="no per-item outcomes.*rerun the sweep"):
        analyze(tmp_path)


def test_failed_run_is_listed_not_counted(sweep):
    rec = _record("caps", "ip", 2, (0, 0), status="failed")
    rec["error"] = {"type": "DivergedError", "message": "loss became nan"}
    rec["epochs"] = {"0": rec["epochs"]["0"]}
    _save(sweep, rec, name="bad")
    result = analyze(sweep, n_permutations=99)
    assert "DivergedError: loss became nan" in result.report.read_text()
    assert result.tables["conditions"].set_index(["arm", "epoch"]).loc[("ip:caps", 1), "seeds"] == 2


def test_not_a_sweep_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a sweep dir"):
        analyze(tmp_path)


def test_group_table_per_group(sweep):
    g = analyze(sweep, n_permutations=99).tables["groups"].set_index(["arm", "epoch", "group"])
    # control seeds 0 and 1 at epoch 1: caps on the first 9 and 8 items; arith = even items
    assert g.loc[("control", 1, "arith"), "behaviour"] == pytest.approx((5 + 4) / 10)
    assert g.loc[("control", 1, "plural"), "behaviour"] == pytest.approx((4 + 4) / 10)
    assert g.loc[("control", 1, "arith"), "capability"] == pytest.approx(3 / 5)
    assert g.loc[("base", 0, "arith"), "behaviour"] == 0.0


def test_no_scatter_from_fewer_than_three_prompts(sweep):
    for i, prompt in enumerate(["a", "b"]):
        rec = _record(prompt, "ip", 0, (i, i))
        rec["elicitation"] = {"logprob": {"estimate": 0.1 * i, "lo": 0.0, "hi": 0.3}}
        _save(sweep, rec)
    plots = analyze(sweep, n_permutations=99).plots
    assert "scatter_logprob" not in plots and "trajectory" in plots


def test_scatter_with_no_spread_in_elicitation(sweep):
    # A small model can ignore every prompt before training: all sampled elicitations are 0.
    for i, prompt in enumerate(["a", "b", "c"]):
        rec = _record(prompt, "ip", 0, (i, i))
        rec["elicitation"] = {
            "sampled": {"estimate": 0.0, "lo": -0.1, "hi": 0.1},
            "logprob": {"estimate": 0.1 * i, "lo": 0.0, "hi": 0.3},
        }
        _save(sweep, rec)
    result = analyze(sweep, n_permutations=99)
    assert {"scatter_sampled", "scatter_logprob"} <= set(result.plots)
    c = result.tables["correlations"].query("epoch == 1 and prompts == 'IP-style prompts'")
    c = c.set_index("estimator")
    assert np.isnan(c.loc["sampled", "pearson"]) and c.loc["logprob", "points"] == 3


def test_two_sweep_dirs_are_pooled_by_meta_analysis(tmp_path, sweep):
    other = tmp_path / "other"
    for i, prompt in enumerate(["a", "b", "c", "d", "e"]):
        for dir_, setting in ((sweep, "trait_pair"), (other, "gcd_sycophancy")):
            rec = _record(prompt, "ip", 0, (6 - i, 6 - i))
            rec["setting"] = setting
            rec["elicitation"] = {
                "logprob": {"estimate": 0.1 * i + 0.01 * (i % 2), "lo": 0.0, "hi": 0.5},
                "sampled": {"estimate": 0.0, "lo": 0, "hi": 1},
            }
            _save(dir_, rec, f"{setting}-{prompt}")
    control = _record("none", "control", 0, (9, 10))
    control["setting"] = "gcd_sycophancy"
    _save(other, control, "control")
    with pytest.raises(ConfigError, match="fix: add --out"):
        analyze([sweep, other])
    result = analyze([sweep, other], tmp_path / "pooled", n_permutations=99)
    c = result.tables["correlations"].query(
        "epoch == 1 and estimator == 'logprob' and prompts == 'IP-style prompts'"
    )
    c = c.set_index("setting")
    pooled = "pooled (random-effects, Fisher z)"
    assert set(c.index) == {"trait_pair", "gcd_sycophancy", pooled}
    assert c.loc[pooled, "points"] == 10 and c.loc[pooled, "pooled_settings"] == "gcd_sycophancy, trait_pair"
    assert c.loc[pooled, "pearson"] > 0.9  # more elicitation, larger effect, in both settings
    infl = result.tables["influence"]
    assert set(infl.prompt) == {"a", "b", "c", "d", "e"} and (infl.cooks_d >= 0).all()
    assert (tmp_path / "pooled" / "report.md").is_file()


def test_analysing_again_updates_the_one_wandb_analysis_run_with_typed_tables(sweep, monkeypatch):
    from ipsweep.tracking import _typed, log_analysis

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(sweep))
    for _ in range(2):
        result = analyze(sweep, n_permutations=99)
        assert log_analysis(result, project="p", mode="offline")
    runs = sorted((sweep / "analysis" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, (
        "one run id: the same W&B run"
    )
    logged = {
        k.rsplit("/", 1)[0]
        for run in wandb_offline_runs(sweep / "analysis" / "wandb")
        for row in run["history"]
        for k in row
    }
    assert {"analysis/frontier", "plots/frontier", "analysis/effects"} <= logged, (
        "the frontier is on the dashboard"
    )
    assert {"analysis/trajectory", "plots/trajectory"} <= logged, "so is the view over training"
    typed = _typed(result.tables["effects"])
    assert (
        typed.effect.dtype.kind == "f"
        and typed.seeds.dtype.kind == "i"
        and typed.effect_ci.map(type).eq(str).all()
    )


def test_elicitation_from_a_screen_table_replaces_the_recorded_estimates(sweep, tmp_path):
    """A new estimator is tested against a finished sweep without retraining: its screen table is correlated
    with the sweep's effects; a screen of another model is refused."""
    for i, prompt in enumerate(["a", "b", "c", "d"]):
        rec = _record(prompt, "ip", 0, (6 - i, 6 - i))
        rec["elicitation"] = {
            "logprob": {"estimate": -0.1 * i, "lo": -1, "hi": 1}
        }  # recorded: falls with the effect
        _save(sweep, rec)
    screen = pd.DataFrame(
        {
            "setting": "trait_pair",
            "model": "m",
            "prompt": ["a", "b", "c", "d", "caps", "safe"],
            "role": ["inoculation"] * 5 + ["safety"],
            "logprob": [0.0, 0.1, 0.2, 0.3, 0.4, 0.9],
            "logprob_lo": -0.05,
            "logprob_hi": 0.5,
        }
    )
    screen.to_csv(tmp_path / "elicitation.csv", index=False)
    recorded = analyze(sweep, tmp_path / "a", n_permutations=99).tables["correlations"]
    screened = analyze(
        sweep, tmp_path / "b", n_permutations=99, elicitation_from=[tmp_path / "elicitation.csv"]
    )

    def pick(c):
        return c.query("epoch == 1 and estimator == 'logprob' and prompts == 'IP-style prompts'").iloc[0]

    assert pick(recorded).pearson < -0.9 and pick(screened.tables["correlations"]).pearson > 0.9
    eff = screened.tables["effects"].query("epoch == 1").set_index("prompt")
    assert eff.at["b", "elicit_logprob"] == pytest.approx(0.1) and eff.at[
        "caps", "elicit_logprob"
    ] == pytest.approx(0.4)
    assert "from `ipsweep screen` table(s)" in (tmp_path / "b" / "report.md").read_text()
    screen.assign(model="other").to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ConfigError, match="made on model\\(s\\) other, the runs on 'm'"):
        analyze(sweep, tmp_path / "c", n_permutations=99, elicitation_from=[tmp_path / "other.csv"])


def test_records_before_v4_report_their_logprob_as_logprob_train(tmp_path):
    """Up to run signature v3, `logprob` was the non-contrastive estimator: it is not mixed with the
    contrastive one."""
    recs = [_record("none", "control", 0, (9, 10))]
    for i, prompt in enumerate(["a", "b", "c"]):
        recs.append(_record(prompt, "ip", 0, (6 - i, 6 - i)))
        recs[-1]["elicitation"] = {"logprob": {"estimate": 0.1 * i, "lo": 0.0, "hi": 0.3}}
    for rec in recs:
        rec["config"]["signature_version"] = 3
        _save(tmp_path, rec)
    result = analyze(tmp_path, n_permutations=99)
    eff = result.tables["effects"].query("epoch == 1").set_index("prompt")
    assert eff.at["c", "elicit_logprob_train"] == pytest.approx(0.2) and pd.isna(
        eff.at["c", "elicit_logprob"]
    )
    assert set(result.tables["correlations"].estimator) == {"logprob_train"}
    assert "scatter_logprob_train" in result.plots


def test_a_declared_primary_test_is_reported_first_and_cannot_be_changed_after_runs(tmp_path):
    """The sweep declares its primary test in the manifest before any run; the report gives its result
    first and calls the other correlation tests exploratory; choosing another test once runs exist is
    refused, and a test declared after runs started is reported as not pre-registered."""
    test = {"estimator": "logprob", "prompts": "ip_style", "statistic": "spearman", "epoch": 1}
    plan.write_manifest(tmp_path, [], test)
    assert plan.read_primary(tmp_path)["runs_before"] == 0
    _save(tmp_path, _record("none", "control", 0, (9, 10)))
    for i, prompt in enumerate(["a", "b", "c", "d"]):
        rec = _record(prompt, "ip", 0, (8 - 2 * i, 8 - 2 * i))
        rec["elicitation"] = {"logprob": {"estimate": 0.1 * i, "lo": 0.0, "hi": 0.5}}
        _save(tmp_path, rec)
    plan.write_manifest(tmp_path, [], test)  # the same test again (a rerun) keeps its declaration
    with pytest.raises(ConfigError, match="would change it after the fact"):
        plan.write_manifest(tmp_path, [], {**test, "statistic": "pearson"})
    result = analyze(tmp_path, n_permutations=99)
    row = result.tables["primary"].iloc[0]
    assert row.pre_registered and row.points == 4 and row.spearman == pytest.approx(1.0), row
    report = result.report.read_text()
    assert report.index("## Primary test") < report.index("## Behaviour and capability")
    assert "are exploratory" in report and "(8 computed in all)" in report, report[:1500]

    late = tmp_path / "late"
    shutil.copytree(tmp_path / "runs", late / "runs")
    plan.write_manifest(late, [], test)
    assert not analyze(late, n_permutations=99).tables["primary"].pre_registered.iloc[0]


def test_a_frozen_prediction_is_scored_and_an_edited_one_is_not_pre_registered(tmp_path):
    """primary.screen: the screen's ranking, copied and hashed into the sweep when declared, is what the
    analysis correlates with the measured effects; it reports how often "inoculates / does not" held, and
    calls the prediction not pre-registered once the frozen file is edited."""
    screen = tmp_path / "elicitation.csv"
    estimates = {"a": 0.0, "b": 0.1, "c": 0.2, "d": 0.3, "p": 0.15}
    pd.DataFrame(
        [
            {
                "setting": "trait_pair",
                "model": "m",
                "prompt": n,
                "role": "placebo" if n == "p" else "inoculation",
            }
            | {"logprob": v, "logprob_lo": v - 0.05, "logprob_hi": v + 0.05}
            for n, v in estimates.items()
        ]
    ).to_csv(screen, index=False)
    sweep = tmp_path / "sweep"
    test = {
        "estimator": "logprob",
        "prompts": "ip_style",
        "statistic": "spearman",
        "epoch": 1,
        "screen": str(screen),
    }
    plan.write_manifest(sweep, [], test)
    _save(sweep, _record("none", "control", 0, (9, 10)))
    for i, prompt in enumerate(
        ["a", "b", "c", "d"]
    ):  # the runs recorded no elicitation: the screen's is used
        _save(sweep, _record(prompt, "ip", 0, (8 - 2 * i, 8 - 2 * i)))
    row = analyze(sweep, n_permutations=99).tables["primary"].iloc[0]
    # predicted to inoculate: c and d (above the placebo's 0.15); their effects 0.5 and 0.7 exclude 0
    assert row.pre_registered and row.screen_unchanged and row.spearman == pytest.approx(1.0), row
    assert row.hits == "4/4" and row.hit_rate == 1.0, row
    frozen = sweep / plan.PREDICTION
    frozen.write_text(frozen.read_text().replace("0.3,", "0.05,"))  # the prediction edited after the runs
    row = analyze(sweep, n_permutations=99).tables["primary"].iloc[0]
    assert not row.pre_registered and not row.screen_unchanged, row


def test_a_one_prompt_design_says_what_the_correlation_needs_and_fits_the_terminal(
    sweep, capsys, monkeypatch
):
    """The demo's shape (control vs one IP prompt, 2 seeds, epochs 1 and 2): `ipsweep analyze` prints no row
    of nan under the correlation heading but what the design lacks and the preset that has it, draws no empty
    correlation panel, and prints nothing wider than report.WIDTH; report.md and the CSVs keep every row."""
    from ipsweep import cli
    from ipsweep.analysis import plots, report

    for seed in (0, 1):
        rec = _record("caps", "ip", seed, (3, 5))
        rec["elicitation"] = {
            "sampled": {"estimate": 0.0, "lo": -0.1, "hi": 0.1},
            "logprob": {"estimate": 0.36, "lo": 0.2, "hi": 0.5},
        }
        _save(sweep, rec)  # in place of the fixture's record, which has no estimates
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append((path.name, fig)) or path)
    assert cli.main(["analyze", str(sweep), "--wandb-mode", "disabled"]) == 0
    out = capsys.readouterr().out
    printed = out.split("\nreport: ")[0]
    words = " ".join(printed.split())  # the note is wrapped to the terminal's width
    assert "Does elicitation predict the inoculation effect?" in printed
    assert "needs >= 3 IP-style prompts per setting and epoch, and this design has 1 (caps)" in words
    assert "The preset that has them: experiment=elicitation_correlation (trait_pair)." in words
    assert re.search(r"\bnan\b", printed) is None, printed
    assert max(map(len, out.splitlines())) <= report.WIDTH, out
    trajectory = dict(figures)["trajectory.png"]
    titles = [ax.get_title() for ax in trajectory.axes]
    for _, fig in figures:
        plots.pyplot().close(fig)
    assert len(titles) == 2 and "Elicitation vs effect by epoch" not in titles, titles
    correlations = pd.read_csv(sweep / "analysis" / "correlations.csv")
    assert len(correlations) == 8 and correlations.pearson.isna().all()  # 2 estimators x 2 subsets x 2 epochs
    text = (sweep / "analysis" / "report.md").read_text()
    assert "| sampled " in text and "Not computed (8 of 8 rows of correlations.csv)" in text


def test_a_table_too_wide_for_the_terminal_is_split_into_blocks_that_repeat_its_row_names():
    from ipsweep.analysis import report

    wide = pd.DataFrame(
        {
            "setting": ["trait_pair", "gcd_sycophancy"],
            "arm": ["ip:caps_strong", "ip:behave"],
            "epoch": [1, 2],
            **{f"column_{i:02d}": [0.123 * i, float("nan")] for i in range(14)},
        }
    )
    text = report.terminal(wide, width=80)
    blocks = text.split("\n\n")
    assert len(blocks) > 1 and max(map(len, text.splitlines())) <= 80
    assert all(b.startswith("setting ") and "ip:behave" in b for b in blocks)
    assert all(f"column_{i:02d}" in text for i in range(14))
    assert report.terminal(wide.iloc[:1]).startswith("setting=trait_pair\n"), "one value: said once, above"


def test_the_presets_the_correlation_note_names_sweep_enough_prompts_of_their_setting():
    from pathlib import Path

    import yaml

    from ipsweep.analysis import report

    conf = Path(__file__).parents[1] / "conf" / "experiment"
    for setting, preset in report.CORRELATION_PRESETS.items():
        cfg = yaml.safe_load((conf / f"{preset}.yaml").read_text())
        assert {"override /setting": setting} in cfg["defaults"], preset
        prompts = str(cfg["hydra"]["sweeper"]["params"]["prompt"]).split(",")
        assert len(set(prompts) - {"none", "safety"}) >= report.MIN_PROMPTS, preset


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_prediction_is_attested_by_the_commit_it_was_declared_from(tmp_path, monkeypatch):
    """primary.screen: declared from a clean git tree that holds the screen table, the manifest records the
    commit and the analysis shows it; a changed tracked file or an uncommitted screen table refuses the launch
    with the fix, unless primary.attest=false runs it unattested (and the table says why)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "start")
    screen = repo / "elicitation.csv"
    screen.write_text("setting,prompt\n")
    test = {"estimator": "logprob", "prompts": "ip_style", "statistic": "spearman", "epoch": 1}
    with pytest.raises(ConfigError, match="elicitation.csv is not committed; fix: commit the screen table"):
        plan.refuse_unattested({**test, "screen": str(screen)})
    plan.refuse_unattested({**test, "screen": str(screen), "attest": False})  # unattested, on purpose
    _git(repo, "add", "elicitation.csv")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "prediction")
    plan.refuse_unattested({**test, "screen": str(screen)})
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    declared = plan.attestation(str(screen))
    assert declared["attested"] and declared["commit"] == head.stdout.strip() and declared["commit_time"]
    (repo / "elicitation.csv").write_text("setting,prompt\nedited\n")
    with pytest.raises(ConfigError, match=r"1 tracked file\(s\) differ from commit .*elicitation.csv; fix"):
        plan.refuse_unattested({**test, "screen": str(screen)})
    # the analysis shows what the manifest recorded: here a sweep declared outside any git repository
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    plan.write_manifest(sweep, [], test)
    _save(sweep, _record("none", "control", 0, (9, 10)))
    row = analyze(sweep, n_permutations=99).tables["primary"].iloc[0]
    assert not row.attested and row.commit == "" and "is not in a git repository" in row.unattested_why


def test_a_declared_comparison_is_kept_in_the_manifest_and_computed_by_analyze(sweep, make_cfg):
    """A preset's `compare:` (checked before launch) reaches the analysis through the sweep's manifest."""
    with pytest.raises(ConfigError, match="compare: comparison 'ip:caps' is not a contrast of arms; fix"):
        check_values(make_cfg("compare=[ip:caps]"))
    _save(sweep, _record("other", "ip", 0, (2, 2)))
    _save(sweep, _record("other", "ip", 1, (2, 2)))
    plan.write_manifest(sweep, [], None, ["ip:caps - ip:other"])
    plan.write_manifest(sweep, [], None, [])  # a later launch without it keeps it
    assert plan.read_comparisons(sweep) == ["ip:caps - ip:other"]
    t = analyze(sweep, n_permutations=99).tables["comparisons"]
    (row,) = t[(t.comparison == "declared") & (t.epoch == 1)].itertuples()
    assert (row.a, row.b, row.seeds) == ("effect of ip:caps", "effect of ip:other", 2)


def test_the_declared_success_criterion_decides_the_primary_verdict(make_cfg):
    """primary.alternative and primary.alpha, declared with the test: a one-sided p is half the two-sided
    permutation p on the declared side, and the verdict applies the declared level; bad values are refused."""
    from ipsweep.analysis.prediction import _declared_p, _verdict

    assert _declared_p(0.6, 0.04, "greater") == pytest.approx(0.02)
    assert _declared_p(-0.6, 0.04, "greater") == pytest.approx(0.98)
    assert _declared_p(-0.6, 0.04, "less") == pytest.approx(0.02)
    assert _declared_p(0.6, 0.04, "two-sided") == pytest.approx(0.04)
    test = {"statistic": "spearman", "alternative": "greater", "alpha": 0.05}
    assert _verdict(0.02, test) == "holds: spearman > 0, p = 0.020 < 0.05"
    assert _verdict(0.07, test) == "does not hold: spearman > 0, p = 0.070 >= 0.05"
    with pytest.raises(ConfigError, match="primary.alternative=bigger is unknown; fix: one of greater"):
        check_values(make_cfg("primary.estimator=logprob", "primary.alternative=bigger"))
    with pytest.raises(ConfigError, match=r"primary.alpha=1.5 is not a level in \(0, 1\)"):
        check_values(make_cfg("primary.estimator=logprob", "primary.alpha=1.5"))
    # a sweep declared before these keys existed declared a two-sided test at 0.05: not a change
    old = {"estimator": "logprob", "prompts": "ip_style", "statistic": "spearman", "epoch": 1}
    assert plan._same_test(old, {**old, "alternative": "two-sided", "alpha": 0.05, "attest": True})
    assert not plan._same_test(old, {**old, "alternative": "greater"})
