"""The contrastive logprob estimator measures the behaviour, not the prompt's wording, on the real embedded model.

trait_pair_greeting (answers that open with "Hello!"): rewriting a prompt that does not ask for the behaviour
(upper-casing it, lower-casing it, dropping its punctuation) must move its estimate by much less than the spread
between the library's inoculation prompts. Measured figures are in README ("Elicitation estimators").
"""

from dataclasses import replace

import pytest

from ipsweep import elicit, models, prompts, screen
from ipsweep.cli import compose
from ipsweep.settings.base import build

pytestmark = pytest.mark.slow


def test_contrastive_logprob_ignores_letter_case_and_punctuation_of_a_prompt_that_does_not_ask_for_it(tmp_path):
    cfg = compose(["setting=trait_pair_greeting", "elicit.logprob_items=32", f"elicit.cache_dir={tmp_path}"])
    setting, lib = build(cfg.setting), prompts.library(cfg.setting)
    model, tok = models.load(cfg.model)
    estimate = lambda p: elicit.logprob(cfg, setting, model, tok, p)["estimate"]  # noqa: E731
    strong, weak = estimate(lib["greet_quote"]), estimate(lib["greet_ok"])
    spread = strong - weak
    assert spread > 0.3, f"the library's inoculation prompts should differ clearly (greet_quote {strong:+.3f}, greet_ok {weak:+.3f})"
    for name in ("irrelevant", "placebo"):
        base = estimate(lib[name])
        for form, rewrite in screen.SURFACE_FORMS.items():
            moved = estimate(replace(lib[name], text=rewrite(lib[name].text))) - base
            assert abs(moved) < 0.25 * spread, f"{name} {form}: moved {moved:+.3f}, spread {spread:.3f}"
