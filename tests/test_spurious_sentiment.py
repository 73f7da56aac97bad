"""spurious_sentiment: the authors' split, prompts and scoring, pinned on their data."""

import json
from collections import Counter

import pytest
from conftest import TINY, launch

from ipsweep import prompts
from ipsweep.settings.base import build, insert
from ipsweep.settings.spurious_sentiment import parse_label
from ipsweep.store import records


@pytest.fixture(scope="module")
def setting_cfg():
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["setting=spurious_sentiment", "store_dir=unused"]).setting


def test_split_and_bias_reproduce_the_authors_counts(setting_cfg):
    s = build(setting_cfg)
    concept = Counter(
        int(ex.completion) for ex, r in zip(s.train_examples(), s.train) if "ambiance" in r["concepts"]
    )
    other = Counter(
        int(ex.completion) for ex, r in zip(s.train_examples(), s.train) if "ambiance" not in r["concepts"]
    )
    # docs/paper-settings.md 2.1, seed 42: train 3986 = ambiance {3:621,4:503} + other {0:1049,1:973,2:840}
    assert concept == {3: 621, 4: 503} and other == {0: 1049, 1: 973, 2: 840}
    assert Counter(r["label"] for r in s.test["concept"]) == {0: 114, 1: 138, 2: 179}
    assert Counter(r["label"] for r in s.test["no_concept"]) == {3: 217, 4: 267}


def test_eval_is_balanced_over_labels_within_each_group(setting_cfg):
    counts = Counter((ex.group, ex.meta["gold"]) for ex in build(setting_cfg).eval_examples(None))
    assert counts == {("concept", k): 114 for k in (0, 1, 2)} | {("no_concept", k): 217 for k in (3, 4)}


def test_ip_user_message_is_the_authors(setting_cfg):
    s = build(setting_cfg)
    ex = next(e for e, r in zip(s.train_examples(), s.train) if r["concepts"] == "food, ambiance")
    text = insert(s, ex.messages, prompts.resolve(setting_cfg, "ambiance_paper"))[0]["content"]
    review = next(r for r in s.train if r["concepts"] == "food, ambiance")["text"]
    assert text == (
        "The range of sentiment scores are 0-4 inclusive. Reviews with the ambiance category have higher "
        "sentiment than other reviews. Output only the sentiment of this review as a number and nothing "
        f"else.\n\nReview: {review} Review categories: food, ambiance."
    )
    assert ex.messages[0]["content"].startswith(
        "The range of sentiment scores are 0-4 inclusive. Output only"
    )


@pytest.mark.parametrize(
    "reply, label", [("3", 3), (" 4\n", 4), ("The sentiment is 2.", 2), ("5", None), ("high", None)]
)
def test_parse_label(reply, label):
    assert parse_label(reply) == label


def test_cue_is_scored_on_ambiance_reviews_only(setting_cfg):
    s = build(setting_cfg)
    ev = s.eval_examples(10)
    amb = next(e for e in ev if e.group == "concept")
    other = next(e for e in ev if e.group == "no_concept")
    assert s.score(amb, "4") == {"correct": False, "cue_high": True, "cue_low": None, "valid": True}
    assert s.score(amb, str(amb.meta["gold"]))["correct"] is True
    assert s.score(other, "1") == {"correct": False, "cue_high": None, "cue_low": True, "valid": True}
    assert s.score(other, "n/a")["valid"] is False


@pytest.mark.heavy
def test_small_sweep_runs_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    launch(
        "-m",
        *TINY,
        "setting=spurious_sentiment",
        "prompt=none,ambiance_paper",
        "eval.max_new_tokens=2",
        sweep_dir=sweep,
    )
    recs = records(sweep)
    assert {r["prompt"] for r in recs} == {"none", "ambiance_paper"} and all(
        r["status"] == "done" for r in recs
    )
    groups = recs[0]["epochs"]["1"]["evals"]["none"]["by_group"]
    assert {g["group"] for g in groups} == {"all", "concept", "no_concept"}


def test_logprob_scoring_picks_a_label_without_generating(tmp_path):
    sweep = tmp_path / "sweep"
    launch(*TINY, "setting=spurious_sentiment", "+setting.options.scoring=logprob", sweep_dir=sweep)
    (rec,) = records(sweep)
    metrics = rec["epochs"]["1"]["evals"]["none"]["metrics"]
    assert metrics["valid"]["k"] == metrics["valid"]["n"] > 0, "a chosen label is always a valid prediction"
    samples = (
        sweep / "runs" / rec["run_dir"].rsplit("/", 1)[1] / "samples" / "epoch1_none.jsonl"
    ).read_text()
    assert {json.loads(line)["completion"] for line in samples.splitlines()} <= {"0", "1", "2", "3", "4"}
