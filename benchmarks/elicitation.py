"""Benchmark 3: the `logprob` elicitation estimator vs the `sampled` one: time per prompt, and agreement.

For every prompt of a setting's library, on the base model, with an empty cache: `sampled` generates
the eval set with the prompt inserted and scores it (the no-prompt baseline is generated once and
shared; its time is reported apart), `logprob` scores the setting's contrast pairs (a reply showing
the behaviour and a matched one) with and without the prompt, no generation. Agreement: Spearman rank
correlation of the two estimates across prompts.

  python benchmarks/elicitation.py                                   # CPU: gcd_sycophancy, 60-token replies
  python benchmarks/elicitation.py --max-new-tokens 150              # GPU, the preset's reply length
"""

from __future__ import annotations

import argparse
import tempfile

from common import MODEL_HELP, Timer, compose, device, model_overrides, save
from scipy import stats

from ipsweep import elicit, models, prompts
from ipsweep.settings.base import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help=MODEL_HELP)
    ap.add_argument("--setting", default="gcd_sycophancy")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--n-eval", default="null", help="eval.n_eval of the sampled estimator")
    a = ap.parse_args()

    cache = tempfile.mkdtemp(prefix="ipsweep-bench-elicit-")  # cold: nothing computed before
    cfg = compose(
        *model_overrides(a.model),
        f"setting={a.setting}",
        f"eval.max_new_tokens={a.max_new_tokens}",
        f"eval.n_eval={a.n_eval}",
        f"elicit.cache_dir={cache}",
    )
    setting, model_tok = build(cfg.setting), models.load(cfg.model)
    model, tok = model_tok
    examples = setting.eval_examples(cfg.eval.n_eval)
    with Timer() as baseline:
        plain = elicit.base_eval(cfg, setting, model, tok, examples, prompts.NO_PROMPT)
    rows = []
    for p in prompts.library(cfg.setting).values():
        if p.role == "safety":  # a PTST prompt, not ranked as an inoculation candidate
            continue
        with Timer() as ts:
            s = elicit.sampled(
                plain, elicit.base_eval(cfg, setting, model, tok, examples, p), setting.behaviour_metric
            )
        with Timer() as tl:
            lp = elicit.logprob(cfg, setting, model, tok, p)
        rows.append(
            {
                "prompt": p.name,
                "sampled": s["estimate"],
                "logprob": lp["estimate"],
                "sampled_s": ts.s,
                "logprob_s": tl.s,
            }
        )
    sampled_s = sum(r["sampled_s"] for r in rows) / len(rows)
    logprob_s = sum(r["logprob_s"] for r in rows) / len(rows)
    rho = stats.spearmanr([r["sampled"] for r in rows], [r["logprob"] for r in rows])
    save(
        "elicitation",
        rows,
        sampled_s_per_prompt=sampled_s,
        logprob_s_per_prompt=logprob_s,
        logprob_speedup=sampled_s / logprob_s,
        no_prompt_baseline_s=baseline.s,
        spearman=float(rho.statistic),
        spearman_p=float(rho.pvalue),
        prompts=len(rows),
        eval_rows=len(examples),
        logprob_items=cfg.elicit.logprob_items,
        model=a.model,
        setting=a.setting,
        max_new_tokens=a.max_new_tokens,
        on=device(),
    )


if __name__ == "__main__":
    main()
