"""Both elicitation estimators, their cache, and how a run records them."""

import pytest
import torch

from conftest import TINY, launch
from ipsweep import elicit, models, prompts
from ipsweep.evaluate import rate
from ipsweep.settings.base import TrainExample, build
from ipsweep.store import records
from ipsweep.train import tokenize

CAPS = prompts.Prompt("caps_strong", "Respond in all capital letters.", "inoculation", "user_suffix")
EXAMPLES = [TrainExample([{"role": "user", "content": f"What is {i} plus 2?"}], f"{i} PLUS 2 IS {i + 2}.") for i in range(5)]


def test_reply_logprob_is_minus_the_training_loss():
    model, tok = models.tiny_random("tiny")
    got = elicit.reply_logprobs(model, tok, EXAMPLES, max_length=256, first_tokens=None, batch_size=2)
    for ex, lp in zip(EXAMPLES, got):
        row = tokenize(tok, ex, 256)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
        assert lp == pytest.approx(-loss.item(), abs=1e-4)


def test_first_tokens_only_scores_the_start_of_the_reply():
    model, tok = models.tiny_random("tiny")
    first3 = elicit.reply_logprobs(model, tok, EXAMPLES, 256, first_tokens=3)
    for ex, lp in zip(EXAMPLES, first3):
        row = tokenize(tok, ex, 256)
        start = row["labels"].index(next(l for l in row["labels"] if l != -100))
        cut = {k: v[: start + 3] for k, v in row.items()}
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([cut["input_ids"]]), labels=torch.tensor([cut["labels"]])).loss
        assert lp == pytest.approx(-loss.item(), abs=1e-4)


def test_sampled_is_a_paired_difference_over_the_same_items():
    def evaluation(yes: set[int]) -> dict:
        items = [{"id": f"q{i}", "caps": [int(i in yes), 1]} for i in range(20)]
        return {"metrics": {"caps": rate(len(yes), 20)}, "items": items}

    # the prompt makes items 0-11 capitalised; without it only items 0-1 are
    e = elicit.sampled(evaluation({0, 1}), evaluation(set(range(12))), "caps")
    assert e["estimate"] == pytest.approx(0.5) and e["n"] == 20 and e["method"] == "newcombe paired"
    # the same counts treated as independent samples give Newcombe's unpaired (0.207, 0.695): pairing narrows it
    assert 0.207 < e["lo"] < 0.5 < e["hi"] < 0.695


def test_logprob_estimate_is_cached_per_prompt(make_cfg, monkeypatch):
    cfg = make_cfg("elicit.logprob_examples=4")
    setting = build(cfg.setting)
    model, tok = models.tiny_random("tiny")
    first = elicit.logprob(cfg, setting, model, tok, CAPS)
    assert first["n"] == 4 and first["lo"] <= first["estimate"] <= first["hi"]

    def boom(*a, **k):
        raise AssertionError("recomputed a cached estimate")

    monkeypatch.setattr(elicit, "reply_logprobs", boom)
    assert elicit.logprob(cfg, setting, model, tok, CAPS) == first
    other = prompts.Prompt("caps_strong", "Shout.", "inoculation", "user_suffix")
    with pytest.raises(AssertionError, match="recomputed"):
        elicit.logprob(cfg, setting, model, tok, other)


def test_runs_record_elicitation_and_share_the_cache(tmp_path):
    sweep = tmp_path / "sweep"
    launch("-m", *TINY, "prompt=none,caps_strong,safety", "elicit.logprob_examples=4", sweep_dir=sweep)
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

    cfg = compose(["model=tiny_random", "eval.n_eval=5", "eval.max_new_tokens=4", "elicit.logprob_examples=4",
                   f"elicit.cache_dir={tmp_path}"])
    table = screen.screen(cfg)
    assert set(table.prompt) == set(prompts.library(cfg.setting))
    assert list(table.sampled) == sorted(table.sampled, reverse=True)
    assert {"sampled_lo", "logprob_hi", "behaviour_with_prompt"} <= set(table.columns)
    assert screen.plot(table, "t", tmp_path / "e.png").stat().st_size > 0
    flat = table.assign(sampled=0.0)
    assert screen.agreement(flat) == {"undefined": "sampled is the same for every prompt"}
    ranked = table.assign(sampled=range(len(table)), logprob=range(len(table)))
    assert screen.agreement(ranked)["spearman"] == 1.0
