import pytest

from ipsweep import models
from ipsweep.evaluate import evaluate, rate
from ipsweep.lm import generate
from ipsweep.prompts import Prompt
from ipsweep.settings.trait_pair import TraitPair


def test_wilson_interval():
    r = rate(7, 20)
    assert (
        r["rate"] == 0.35
        and r["lo"] == pytest.approx(0.1812, abs=1e-3)
        and r["hi"] == pytest.approx(0.5671, abs=1e-3)
    )
    assert rate(0, 0)["rate"] is None


def test_batched_generation_equals_one_at_a_time(make_cfg):
    cfg = make_cfg("eval.max_new_tokens=8")
    model, tok = models.tiny_random("tiny")
    chats = [
        [{"role": "user", "content": q}]
        for q in ["Hi", "What is the capital of France, my friend?", "Plural of mouse?"]
    ]
    batched = generate(model, tok, chats, cfg.eval)
    single = [generate(model, tok, [c], cfg.eval)[0] for c in chats]
    assert batched == single


def test_evaluate_counts_and_groups(make_cfg):
    cfg = make_cfg()
    model, tok = models.tiny_random("tiny")
    setting = TraitPair()
    examples = setting.eval_examples(10)
    caps = Prompt("caps", "Respond in all capital letters.", "inoculation", "user_suffix")
    result = evaluate(model, tok, setting, examples, caps, cfg.eval)
    assert result["test_prompt"] == "caps"
    assert result["metrics"]["caps"]["n"] == 10 and result["metrics"]["correct"]["n"] == 10
    assert all(s["prompt"].endswith(" Respond in all capital letters.") for s in result["samples"])
    groups = {g["group"] for g in result["by_group"] if g["metric"] == "caps"}
    assert {"all", "arith", "plural"} <= groups
    assert sum(g["n"] for g in result["by_group"] if g["metric"] == "caps" and g["group"] != "all") == 10
