"""RESULTS.md is generated from committed analysis CSVs, which are generated from committed run records."""

import pandas as pd
import pytest
import yaml

from ipsweep import results
from ipsweep.analysis import analyze
from ipsweep.errors import ConfigError

EXPERIMENTS = sorted(p.parent for p in results.RESULTS_DIR.glob("*/runs"))


def _read(path):
    """A CSV as a frame; an analysis writes an empty file for an empty table (e.g. no correlation from 2
    prompts)."""
    return pd.read_csv(path) if path.stat().st_size > 1 else pd.DataFrame()


def test_results_md_agrees_with_the_committed_csvs():
    assert results.stale_blocks() == [], "fix: run `ipsweep results` and commit"
    assert results.RESULTS_MD.read_text().count("<!-- table:") >= 4
    assert results.unsourced_numbers() == [], "fix: cite the tables' numbers, or mark literature figures"


def test_a_number_the_prose_cites_must_be_in_its_sections_tables(tmp_path):
    table = "<!-- table: x | a | -->\n| a |\n|---|\n| 0.25 |\n<!-- /table -->\n"
    md = tmp_path / "R.md"
    md.write_text(
        f"# R\n\n## One\n\n{table}\nThe effect is 0.25, or -0.25 reversed; `0.99` is code.\n"
        "<!-- literature -->The paper reports r = 0.57.<!-- /literature -->\n\n"
        "## Two\n\nA claim of 0.25 here has no table beside it, nor 0.31.\n"
    )
    assert results.unsourced_numbers(md) == ["Two: 0.25", "Two: 0.31"]


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
@pytest.mark.heavy
def test_committed_csvs_are_what_analyze_makes_of_the_committed_records(experiment, tmp_path):
    analyze(experiment, tmp_path)
    for name in (
        "conditions",
        "effects",
        "correlations",
        "influence",
        "elicitation",
        "power",
        "frontier",
        "leaks",
        "comparisons",
        "capability_by_behaviour",
    ):
        committed, fresh = (_read(d / f"{name}.csv") for d in (experiment / "analysis", tmp_path))
        pd.testing.assert_frame_equal(
            committed, fresh, check_exact=False, rtol=1e-9, obj=f"{experiment.name}/{name}.csv"
        )


SCREENED = [e for e in EXPERIMENTS if list((e / "screen").glob("*.csv"))]


@pytest.mark.parametrize("experiment", SCREENED, ids=[p.name for p in SCREENED])
@pytest.mark.heavy
def test_committed_screened_analysis_is_what_analyze_makes_with_the_committed_screen(experiment, tmp_path):
    """docs/results/<name>/analysis_screened/: the same runs with the elicitation estimates of the committed
    `ipsweep screen` table(s) in docs/results/<name>/screen/ (ipsweep analyze ... --elicitation)."""
    analyze(experiment, tmp_path, elicitation_from=sorted((experiment / "screen").glob("*.csv")))
    for name in ("effects", "correlations", "influence", "elicitation"):
        committed, fresh = (_read(d / f"{name}.csv") for d in (experiment / "analysis_screened", tmp_path))
        pd.testing.assert_frame_equal(
            committed, fresh, check_exact=False, rtol=1e-9, obj=f"{experiment.name}/{name}.csv"
        )


def test_a_block_is_filled_from_its_csv_and_a_stale_one_is_found(tmp_path):
    (tmp_path / "x").mkdir()
    pd.DataFrame({"arm": ["ip:a", "ip:b"], "effect": [0.256, -0.1], "n": [3, 4]}).to_csv(
        tmp_path / "x" / "e.csv", index=False
    )
    md = tmp_path / "R.md"
    md.write_text("intro\n<!-- table: x/e.csv | arm, effect | effect > 0 -->\nold\n<!-- /table -->\nend\n")
    assert results.stale_blocks(md, tmp_path) == ["x/e.csv | arm, effect | effect > 0"]
    results.update(md, tmp_path)
    assert (
        md.read_text()
        == "intro\n<!-- table: x/e.csv | arm, effect | effect > 0 -->\n| arm | effect |\n|---|---|\n"
        "| ip:a | 0.26 |\n<!-- /table -->\nend\n"
    )
    assert results.stale_blocks(md, tmp_path) == []


def test_prose_may_not_conclude_from_overlap_or_from_an_interval_that_includes_0(tmp_path):
    """results --check's vocabulary: a reading of two intervals' overlap, 'no difference' without 'detected',
    and 'excludes 0' after an interval that includes it are refused; the generated verdicts' words pass."""
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "## A\n\n- The two intervals overlap, so case does not change the effect.\n"
        "- An effect of 0.26 [-0.04, 0.48], which excludes 0.\n"
        "- An effect of 0.26 [0.04, 0.48], which excludes 0; no difference detected for the keywords.\n"
        "- A test of no effect. The arms show no effect.\n"
    )
    problems = results.verdict_problems(md)
    assert len(problems) == 3, problems
    assert "overlapping is not a comparison" in problems[0]
    assert "'excludes 0' after [-0.04, 0.48], which includes 0" in problems[1]
    assert "The arms show no effect" in problems[2]
    assert results.verdict_problems() == [], "RESULTS.md's prose"


def test_the_findings_table_fills_each_answer_from_one_row(tmp_path):
    """RESULTS.md opens on findings: each answer comes from the one CSV row its entry names, with a link to
    its section; an entry that selects several rows is an error, not a guess."""
    (tmp_path / "x").mkdir()
    pd.DataFrame(
        {"arm": ["ip:a", "ip:b"], "verdict": ["ip:a exceeds ip:b by 0.20 [0.05, 0.35]", "-"]}
    ).to_csv(tmp_path / "x" / "c.csv", index=False)
    entry = {
        "experiment": "x",
        "question": "A or B?",
        "section": "Letter case x content: a, b",
        "csv": "x/c.csv",
    }
    (tmp_path / "f.yaml").write_text(
        yaml.safe_dump([{**entry, "query": "arm == 'ip:a'", "answer": "{verdict}"}])
    )
    assert results.render_table("f.yaml | question, answer, experiment |", tmp_path) == (
        "| question | answer | experiment |\n|---|---|---|\n"
        "| A or B? | ip:a exceeds ip:b by 0.20 [0.05, 0.35] | [x](#letter-case-x-content-a-b) |\n"
    )
    (tmp_path / "f.yaml").write_text(yaml.safe_dump([{**entry, "query": "arm != ''", "answer": "{verdict}"}]))
    with pytest.raises(ConfigError, match="'A or B\\?' selects 2 rows of x/c.csv; fix"):
        results.render_table("f.yaml | question, answer |", tmp_path)
