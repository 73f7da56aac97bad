"""The contrastive logprob estimator measures the behaviour, not the prompt's wording, on the real embedded
model.

trait_pair_greeting (answers that open with "Hello!"): rewriting a prompt that does not ask for the behaviour
(upper-casing it, lower-casing it, dropping its punctuation) must move its estimate by much less than the
spread between the library's inoculation prompts, and the estimator must rank every inoculation prompt above
every placebo and neutral prompt. (Not above the safety prompt, which forbids a greeting: it scores beside the
weakest inoculation prompts, so no claim is made for it.) The figures are those of the committed frozen screen
(docs/results/prediction_greeting_cpu/prediction.csv; docs/elicitation.md).
"""

from dataclasses import replace

import pandas as pd
import pytest
from conftest import ROOT

from ipsweep import elicit, models, prompts, screen
from ipsweep.cli import compose
from ipsweep.settings.base import build

pytestmark = pytest.mark.slow
SCREEN = ROOT / "docs" / "results" / "prediction_greeting_cpu" / "prediction.csv"


def test_contrastive_logprob_ignores_the_form_of_prompts_that_do_not_ask_for_the_behaviour(tmp_path):
    cfg = compose(["setting=trait_pair_greeting", f"elicit.cache_dir={tmp_path}"])  # 64 pairs, as the screen
    setting, lib = build(cfg.setting), prompts.library(cfg.setting)
    model, tok = models.load(cfg.model)

    def estimate(p):
        return elicit.logprob(cfg, setting, model, tok, p)["estimate"]

    # The inoculation prompts' estimates as the committed frozen screen has them; the strongest and the
    # weakest recomputed here, so the figures are this model's, not a stale file's (~14 s each on 2 cores).
    committed = pd.read_csv(SCREEN).set_index("prompt")["logprob"]
    lib = {n: p for n, p in lib.items() if n in committed}  # the library as the frozen screen had it
    asking = {n: committed[n] for n, p in lib.items() if p.role == "inoculation"}
    for name in (max(asking, key=asking.get), min(asking, key=asking.get)):
        assert estimate(lib[name]) == pytest.approx(asking[name], abs=1e-3), name
    others = {n: committed[n] for n, p in lib.items() if p.role in ("placebo", "neutral")}
    spread = max(asking.values()) - min(asking.values())
    assert spread > 0.3 and min(asking.values()) > max(others.values()), (asking, others)
    assert asking["greet_quote"] == pytest.approx(0.923, abs=0.01)
    # The rewrites, each against its prompt as written, on the screen's first 32 contrast pairs (half the
    # cost; a shift is a difference of two estimates over the same pairs).
    cfg.elicit.logprob_items = 32
    for name in others:
        base = estimate(lib[name])
        for form, rewrite in screen.SURFACE_FORMS.items():
            moved = estimate(replace(lib[name], text=rewrite(lib[name].text))) - base
            assert abs(moved) < screen.FLAG_SHARE * spread, (
                f"{name} {form}: moved {moved:+.3f}, spread {spread:.3f}"
            )
