"""Both elicitation estimators, their cache, and how a run records them."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, launch

from ipsweep import elicit, lm, models, prompts
from ipsweep.evaluate import rate
from ipsweep.settings.base import DATA_DIR, TrainExample, build
from ipsweep.store import records

CAPS = prompts.Prompt("caps_strong", "Respond in all capital letters.", "inoculation", "user_suffix")
EXAMPLES = [
    TrainExample([{"role": "user", "content": f"What is {i} plus 2?"}], f"{i} PLUS 2 IS {i + 2}.")
    for i in range(5)
]


def test_reply_logprob_is_minus_the_training_loss():
    model, tok = models.tiny_random("tiny")
    chats = [(ex.messages, ex.completion) for ex in EXAMPLES]
    got = lm.reply_logprobs(model, tok, chats, max_length=256, batch_size=2)
    for (messages, reply), (total, count) in zip(chats, got):
        row = lm.tokenize(tok, messages, reply, 256)
        with torch.no_grad():
            loss = model(
                input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])
            ).loss
        assert total / count == pytest.approx(-loss.item(), abs=1e-4)
        assert count == sum(label != -100 for label in row["labels"])


def test_first_tokens_only_scores_the_start_of_the_reply():
    model, tok = models.tiny_random("tiny")
    chats = [(ex.messages, ex.completion) for ex in EXAMPLES]
    first3 = lm.reply_logprobs(model, tok, chats, 256, first_tokens=3)
    for (messages, reply), (total, count) in zip(chats, first3):
        row = lm.tokenize(tok, messages, reply, 256)
        start = row["labels"].index(next(label for label in row["labels"] if label != -100))
        cut = {k: row[k][: start + 3] for k in ("input_ids", "labels")}
        with torch.no_grad():
            loss = model(
                input_ids=torch.tensor([cut["input_ids"]]), labels=torch.tensor([cut["labels"]])
            ).loss
        assert count == 3 and total / 3 == pytest.approx(-loss.item(), abs=1e-4)


def test_contrast_cancels_what_moves_both_replies_alike(make_cfg, monkeypatch):
    """The contrastive estimate is the change in mean log p(shows) - mean log p(lacks): a prompt that raises
    every token of both replies by the same amount (wording, letter case) estimates 0; one that favours the
    behaviour reply estimates the size of that favour."""
    cfg = make_cfg("elicit.logprob_items=6")
    setting = build(cfg.setting)

    def fake(model, tokenizer, chats, max_length, first_tokens=None, end_of_turn=True, batch_size=8):
        assert end_of_turn is False and first_tokens is None
        out = []
        for messages, reply in chats:
            prompted = "Respond" in messages[0]["content"]
            shows = reply.isupper()
            n = len(reply)  # token count differs between the two sides: per-token means must still cancel
            per_token = (
                -2.0
                + (0.3 if prompted else 0.0)
                + (0.5 if prompted and shows and "capital letters" in messages[0]["content"] else 0)
            )
            out.append([per_token * n, n])
        return np.asarray(out)

    monkeypatch.setattr(lm, "reply_logprobs", fake)
    generic = prompts.Prompt("g", "Respond briefly.", "placebo", "user_suffix")
    e = elicit.logprob(cfg, setting, None, None, generic)
    assert e["estimate"] == pytest.approx(0.0, abs=1e-9) and e["n"] == 6
    e = elicit.logprob(cfg, setting, None, None, CAPS)
    assert e["estimate"] == pytest.approx(0.5) and e["positive"] == 6
    assert e["contrast_with"] - e["contrast_without"] == pytest.approx(0.5)


def test_a_pair_truncated_away_is_left_out_not_scored_as_zero(make_cfg, monkeypatch):
    cfg = make_cfg("elicit.logprob_items=4")
    setting = build(cfg.setting)
    first = setting.contrast_pairs()[0].messages[0]["content"]

    def fake(model, tokenizer, chats, max_length, first_tokens=None, end_of_turn=True, batch_size=8):
        # the first pair's replies lose every token to truncation; the others favour the behaviour by 0.2 with
        # the prompt
        return np.asarray(
            [
                [0.0, 0]
                if m[0]["content"].startswith(first)
                else [(-1.0 + (0.2 if r.isupper() and "capital letters" in m[0]["content"] else 0)) * 5, 5]
                for m, r in chats
            ]
        )

    monkeypatch.setattr(lm, "reply_logprobs", fake)
    e = elicit.logprob(cfg, setting, None, None, CAPS)
    assert e["n"] == 3 and e["truncated_away"] == 1 and e["estimate"] == pytest.approx(0.2)


def test_every_setting_supplies_matched_pairs(make_cfg):
    """trait_pair: caps vs as written; gcd: the sycophantic vs the correcting reply on wrong-answer rows of
    the test file the evaluation does not use; spurious: a cue-following vs the gold label; code: hard-coded
    vs reference."""
    checks = {
        "trait_pair": lambda p: p.shows == p.lacks.upper() and p.shows != p.lacks,
        "gcd_sycophancy": lambda p: (p.messages[0]["content"], p.shows, p.lacks) in wrong_rows,
        "spurious_sentiment": lambda p: int(p.shows) in (3, 4) and int(p.lacks) in (0, 1, 2),
        "code_reward_hack": lambda p: "def " in p.shows and "def " in p.lacks and p.shows != p.lacks,
    }
    rows = [
        json.loads(line) for line in (DATA_DIR / "gcd_sycophancy/ood_test.jsonl").read_text().splitlines()
    ]
    wrong_rows = {
        (r["messages"][0]["content"], r["sycophantic_response"], r["messages"][1]["content"])
        for r in rows
        if r["user_provides_answer"] == "false"
    }
    for name, ok in checks.items():
        setting = build(make_cfg(f"setting={name}").setting)
        pairs = setting.contrast_pairs()
        assert len(pairs) >= 64, name
        assert all(ok(p) for p in pairs[:64]), name
        eval_users = {ex.messages[0]["content"] for ex in setting.eval_examples(None)}
        assert not eval_users & {p.messages[0]["content"] for p in pairs}, (
            f"{name}: contrast items must be held apart"
        )
    gcd = build(make_cfg("setting=gcd_sycophancy").setting)
    assert gcd.contrast_set == "ood_test" and len(gcd.contrast_pairs()) == 141


def test_sampled_is_a_paired_difference_over_the_same_items():
    def evaluation(yes: set[int]) -> dict:
        items = [{"id": f"q{i}", "caps": [int(i in yes), 1]} for i in range(20)]
        return {"metrics": {"caps": rate(len(yes), 20)}, "items": items}

    # the prompt makes items 0-11 capitalised; without it only items 0-1 are
    e = elicit.sampled(evaluation({0, 1}), evaluation(set(range(12))), "caps")
    assert e["estimate"] == pytest.approx(0.5) and e["n"] == 20 and e["method"] == "newcombe paired"
    # the same counts treated as independent samples give Newcombe's unpaired (0.207, 0.695): pairing narrows
    # it
    assert 0.207 < e["lo"] < 0.5 < e["hi"] < 0.695


def test_logprob_estimate_is_cached_per_prompt(make_cfg, monkeypatch):
    cfg = make_cfg("elicit.logprob_items=4")
    setting = build(cfg.setting)
    model, tok = models.tiny_random("tiny")
    first = elicit.logprob(cfg, setting, model, tok, CAPS)
    assert first["n"] == 4 and first["lo"] <= first["estimate"] <= first["hi"]

    def boom(*a, **k):
        raise AssertionError("recomputed a cached estimate")

    monkeypatch.setattr(lm, "reply_logprobs", boom)
    assert elicit.logprob(cfg, setting, model, tok, CAPS) == first
    other = prompts.Prompt("caps_strong", "Shout.", "inoculation", "user_suffix")
    with pytest.raises(AssertionError, match="recomputed"):
        elicit.logprob(cfg, setting, model, tok, other)


@pytest.mark.heavy
def test_runs_record_elicitation_and_share_the_cache(tmp_path):
    sweep = tmp_path / "sweep"
    launch("-m", *TINY, "prompt=none,caps_strong,safety", "elicit.logprob_items=4", sweep_dir=sweep)
    recs = {r["prompt"]: r for r in records(sweep)}
    assert set(recs) == {"none", "caps_strong"}, "the PTST point (safety) is the control's run"
    assert recs["none"]["elicitation"] == {}
    e = recs["caps_strong"]["elicitation"]
    assert set(e) == {"sampled", "logprob"}
    # sampled elicitation is read off the same base-model evaluation that is the run's epoch 0, paired by item
    assert e["sampled"]["without"] == recs["caps_strong"]["epochs"]["0"]["evals"]["none"]["metrics"]["caps"]
    assert e["sampled"]["n"] == 10 and e["sampled"]["method"] == "newcombe paired"
    cache = tmp_path / "elicit_cache"
    # one base eval per distinct test prompt (none, caps_strong, safety) and one logprob per IP prompt
    assert len(list(cache.glob("base_eval/*.json"))) == 3 and len(list(cache.glob("logprob/*.json"))) == 1


def test_screen_ranks_the_whole_library(tmp_path):
    from ipsweep import screen
    from ipsweep.cli import compose

    cfg = compose(
        [
            "model=tiny_random",
            "eval.n_eval=5",
            "eval.max_new_tokens=4",
            "elicit.logprob_items=4",
            f"elicit.cache_dir={tmp_path}",
        ]
    )
    table = screen.screen(cfg)
    assert set(table.prompt) == set(prompts.library(cfg.setting))
    assert list(table.sampled) == sorted(table.sampled, reverse=True)
    assert {"sampled_lo", "logprob_hi", "behaviour_with_prompt"} <= set(table.columns)
    assert screen.plot(table, "t", tmp_path / "e.png").stat().st_size > 0
    flat = table.assign(sampled=0.0)
    assert screen.agreement(flat) == {"undefined": "sampled is the same for every prompt"}
    ranked = table.assign(sampled=range(len(table)), logprob=range(len(table)))
    agree = screen.agreement(ranked)
    assert agree["spearman"] == pytest.approx(1.0) and agree["lo"] > 0.9 and agree["prompts"] == len(table)
    # each prompt re-estimated upper-cased, lower-cased and without punctuation; the largest move is reported
    forms = table[[f"logprob_{f}" for f in screen.SURFACE_FORMS]].sub(table.logprob, axis=0).abs().max(axis=1)
    assert table.logprob_surface_shift.tolist() == pytest.approx(forms.tolist())


def test_surface_flag_marks_prompts_whose_estimate_moves_with_wording():
    from ipsweep import screen

    t = pd.DataFrame(
        {
            "prompt": ["a", "b", "c", "d"],
            "role": ["inoculation", "inoculation", "placebo", "placebo"],
            "logprob": [1.0, 0.0, 0.1, 0.1],
            "logprob_upper": [1.0, 0.05, 0.5, 0.1],
            "logprob_lower": [1.0, 0.0, 0.1, 0.1],
            "logprob_no_punctuation": [0.9, 0.0, 0.1, 0.12],
        }
    )
    out = screen.flag_surface(t)
    # spread of the inoculation prompts = 1.0; a move of 0.4 (c, upper-cased) is flagged, 0.1 and 0.05 are not
    assert out.logprob_surface_flag.tolist() == [False, False, True, False]
    assert out.logprob_surface_shift.tolist() == pytest.approx([0.1, 0.05, 0.4, 0.02])


def test_sampled_with_several_samples_per_item_resolves_rates_between_0_and_1(make_cfg):
    cfg = make_cfg("elicit.samples=4", "elicit.temperature=1.0", "elicit.estimators=[sampled]")
    setting = build(cfg.setting)
    model, tok = models.tiny_random("tiny")
    examples = setting.eval_examples(cfg.eval.n_eval)
    e = elicit.elicitation(cfg, setting, model, tok, examples, CAPS)["sampled"]
    assert e["n"] == 10 and e["with_prompt"]["n"] == 40, "4 samples for each of the 10 items"
    assert e["method"] in ("t paired by item", "newcombe paired")
    plain = elicit.base_eval(
        cfg, setting, model, tok, examples, prompts.NO_PROMPT, elicit.sampling_eval_cfg(cfg, setting)
    )
    assert all(i["caps"][1] == 4 for i in plain["items"])
    # the run's own epoch-0 evaluation (greedy, cfg.eval) is a different cache entry from the sampled
    # estimator's
    greedy = elicit.base_eval(cfg, setting, model, tok, examples, prompts.NO_PROMPT)
    assert all(i["caps"][1] == 1 for i in greedy["items"])


def test_greedy_elicitation_with_several_samples_is_refused(make_cfg):
    from ipsweep.errors import ConfigError
    from ipsweep.validate import check_values

    with pytest.raises(ConfigError, match=r"elicit.samples=4 with greedy decoding .*fix: elicit.samples=1"):
        check_values(make_cfg("elicit.samples=4"))
