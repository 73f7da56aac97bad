"""The research axes beyond prompt x seed x epochs: paraphrase mixes, prompt placement, leak tests, and the
capability vs behaviour frontier."""

import json
from collections import Counter

import pandas as pd
import pytest
from conftest import TINY, launch

from ipsweep import analysis, prompts
from ipsweep.analysis import tables
from ipsweep.errors import ConfigError
from ipsweep.plan import plan
from ipsweep.settings.base import insert
from ipsweep.store import records


def _caps(make_cfg, *overrides):
    cfg = make_cfg("setting=trait_pair", "prompt=caps_strong", *overrides)
    return plan(cfg)


def test_a_mixed_run_draws_a_text_per_example_and_the_seed_reproduces_it(make_cfg):
    p = _caps(make_cfg, "train.prompt_mode=mixed").run_prompt
    assert p.mode == "mixed" and len(p.training_texts) == 21 and p.paraphrases[-1] not in p.training_texts
    draws = prompts.draw(p, 200, seed=0)
    assert draws == prompts.draw(p, 200, seed=0), "the same seed draws the same texts"
    assert draws != prompts.draw(p, 200, seed=1)
    assert len(set(draws)) > 15 and max(Counter(draws).values()) < 30, "texts vary per example"
    fixed = _caps(make_cfg).run_prompt
    assert fixed.training_texts == (fixed.text,) and set(prompts.draw(fixed, 50, seed=0)) == {0}


def test_mode_and_placement_enter_the_signature_but_the_control_is_shared(make_cfg):
    fixed, mixed = _caps(make_cfg), _caps(make_cfg, "train.prompt_mode=mixed")
    moved = _caps(make_cfg, "prompt_placement=system")
    assert len({fixed.signature, mixed.signature, moved.signature}) == 3
    controls = {
        plan(make_cfg("setting=trait_pair", "prompt=none", *o)).signature
        for o in [(), ("train.prompt_mode=mixed",), ("prompt_placement=system",)]
    }
    assert len(controls) == 1, "a control has no prompt to mix or move: one run serves every variant"


@pytest.mark.parametrize(
    "placement, where",
    [
        ("user_prefix", lambda chat: chat[-1]["content"].startswith("Respond in all capital letters. ")),
        ("user_suffix", lambda chat: chat[-1]["content"].endswith(" Respond in all capital letters.")),
        ("system", lambda chat: chat[0] == {"role": "system", "content": "Respond in all capital letters."}),
    ],
)
def test_placement_changes_where_the_trained_prompt_goes(make_cfg, placement, where):
    point = _caps(make_cfg, f"prompt_placement={placement}")
    chat = insert(point.setting, point.setting.train_examples()[0].messages, point.run_prompt)
    assert point.run_prompt.placement == placement and where(chat)


def test_bad_axis_values_fail_before_any_job(make_cfg):
    with pytest.raises(ConfigError, match="prompt_mode=mixed needs paraphrases.*fix"):
        plan(make_cfg("setting=trait_pair", "prompt=placebo", "train.prompt_mode=mixed"))
    with pytest.raises(ConfigError, match="no instruction of its own to replace"):
        plan(make_cfg("setting=trait_pair", "prompt=caps_strong", "prompt_placement=replace_preamble"))
    with pytest.raises(ConfigError, match="prompt_placement=sideways is unknown"):
        plan(make_cfg("setting=trait_pair", "prompt=caps_strong", "prompt_placement=sideways"))


def test_leak_tests_add_the_negation_keywords_and_held_out_paraphrase(make_cfg):
    ip = _caps(make_cfg, "eval.leak_tests=true")
    names = {t.name: t for t in ip.test_prompts}
    assert {"caps_strong~negation", "caps_strong~keywords", "caps_strong~heldout"} <= set(names)
    assert names["caps_strong~negation"].text == "Do not respond in all capital letters."
    assert names["caps_strong~heldout"].text == ip.run_prompt.paraphrases[-1]
    # an instruction unrelated to the trait (the library's placebo) at the same place: the any-suffix control
    assert names["placebo~unrelated"].text == "Be concise."
    assert names["placebo~unrelated"].placement == ip.run_prompt.placement
    control = plan(make_cfg("setting=trait_pair", "prompt=none", "eval.leak_tests=true"))
    control_names = [t.name for t in control.test_prompts]
    assert {"caps_strong~negation", "caps_strong~heldout", "placebo~unrelated"} <= set(control_names), (
        "the control is tested with the same prompts: each leak's baseline"
    )
    assert control_names.count("placebo~unrelated") == 1, "one unrelated evaluation, not one per prompt"
    placebo = plan(make_cfg("setting=trait_pair", "prompt=placebo", "eval.leak_tests=true"))
    assert "irrelevant~unrelated" in {t.name for t in placebo.test_prompts}, "never the arm's own prompt"


def test_every_offline_setting_ships_paraphrases_and_near_duplicates_of_its_paper_prompt(make_cfg):
    for setting, name in [
        ("trait_pair", "caps_strong"),
        ("trait_pair_greeting", "greet_quote"),
        ("gcd_sycophancy", "behave"),
        ("spurious_sentiment", "ambiance_paper"),
        ("code_reward_hack", "hack_paper"),
    ]:
        p = prompts.library(make_cfg(f"setting={setting}").setting)[name]
        assert len(set(p.paraphrases)) >= 20 and p.text not in p.paraphrases and p.negation and p.keywords
        assert p.text.startswith("\n") == all(t.startswith("\n") for t in p.paraphrases), (
            "paraphrases keep the join"
        )
        # near-duplicates (leak tests): 1, 3 and 5 words changed, keeping the join too
        assert [k for k, _ in p.near] == ["near1", "near3", "near5"], setting
        assert all(t.startswith("\n") == p.text.startswith("\n") for _, t in p.near)


def test_frontier_marks_the_arms_no_other_arm_beats_on_both_axes():
    rows = [
        ("base", 0, 0.0, 0.5),
        ("control", 1, 0.9, 0.9),
        ("ip:a", 1, 0.2, 0.8),
        ("ip:b", 1, 0.3, 0.7),
        ("ip:c", 1, 0.05, 0.3),
    ]
    t = pd.DataFrame(
        [
            {"setting": "s", "design": "d", "arm": a, "epoch": e, "behaviour": b, "capability": c}
            for a, e, b, c in rows
        ]
    )
    f = tables.frontier_table(t)
    # base (the untrained model) is the reference, not a candidate: it does not push ip:c off the frontier
    assert dict(zip(f.arm, f.on_frontier)) == {
        "base": False,
        "control": True,
        "ip:a": True,
        "ip:b": False,
        "ip:c": True,
    }


@pytest.mark.heavy
def test_a_sweep_over_the_axes_reports_leaks_and_the_frontier(tmp_path):
    sweep = tmp_path / "sweep"
    launch(
        "-m",
        "setting=trait_pair",
        *TINY,
        "prompt=none,caps_strong",
        "train.prompt_mode=fixed,mixed",
        "eval.leak_tests=true",
        "eval.n_eval=6",
        sweep_dir=sweep,
    )
    recs = records(sweep)
    mixed = next(r for r in recs if r["prompt_mode"] == "mixed" and r["condition"] == "ip")
    assert len(mixed["prompt_draws"]["per_example"]) == mixed["n_train"]
    assert len(set(mixed["prompt_draws"]["per_example"])) > 1
    assert len([r for r in recs if r["condition"] == "control"]) == 1, "both modes share one control run"
    result = analysis.analyze(sweep)
    leaks = result.tables["leaks"]
    assert set(leaks.leak) == {"negation", "keywords", "heldout", "near1", "near3", "near5", "unrelated"}
    assert {"control", "ip:caps_strong", "ip:caps_strong[mixed]", "base"} <= set(leaks.arm)
    assert leaks.behaviour.between(0, 1).all() and (leaks.behaviour_lo <= leaks.behaviour_hi).all()
    assert "on_frontier" in result.tables["frontier"] and result.plots["frontier"].is_file()
    report = result.report.read_text()
    assert "## Leak tests" in report and "## Capability vs behaviour: the frontier" in report
    assert set(result.tables["correlations"].get("variant", pd.Series(dtype=str))) <= {"", "[mixed]"}
    json.dumps(mixed["prompt_draws"])  # recorded as plain data


def test_naming_the_library_placement_is_the_library_run(make_cfg):
    same = _caps(make_cfg, "prompt_placement=user_suffix")  # trait_pair's own placement
    assert same.signature == _caps(make_cfg).signature and not same.run_prompt.moved
    assert _caps(make_cfg, "prompt_placement=system").run_prompt.moved


def test_a_moved_safety_prompt_is_its_own_evaluation_of_the_shared_control(make_cfg):
    here = plan(make_cfg("setting=trait_pair", "prompt=safety"))
    moved = plan(make_cfg("setting=trait_pair", "prompt=safety", "prompt_placement=system"))
    assert here.signature == moved.signature, "PTST tests the control's run"
    assert (here.headline, moved.headline) == ("safety", "safety@system")
