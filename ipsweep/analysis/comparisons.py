"""Paired comparisons: two measurements made on the same seeds and items, compared through their per-(seed,
item) differences, never through whether their own intervals overlap (docs/statistics.md).

Made by default, wherever the records hold them:
- leak tests: an arm's trained models under a leak test prompt vs the unmodified prompt, and under each
  related leak (negation, keywords, held-out paraphrase, near-duplicates) vs the unrelated instruction:
  b(first) - b(second), the same models scoring the same items;
- research axes: an arm's effect (b(control) - b(arm)) in one design vs the same arm's in the design that
  differs in one axis (LoRA vs full fine-tuning, flawed share, LoRA rank), each side with its own control,
  paired by seed and item; and within a design, a prompt's variants (a paraphrase bank's size, a moved
  placement) vs the first of them;
and any contrast of a design's arms declared with `--compare`, e.g. "ip:a - ip:b" or a 2x2's interaction
"ip:a - ip:b - ip:c + ip:d", as weights on their effects.

Each row: the estimate with the crossed seeds x items interval of the differences (their own seed variance:
no other arm enters), a t p-value, the smallest difference the design could detect (80% power, two-sided 5%)
and a verdict in fixed words chosen from the numbers (VERDICTS).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ipsweep import prompts
from ipsweep.analysis import inference
from ipsweep.analysis.frames import AXES
from ipsweep.analysis.tables import fmt_ci
from ipsweep.contrast import parse

# The verdicts a comparison can get, chosen from its interval (verdict()).
VERDICTS = {
    "exceeds": "{x} exceeds {y} by {d:.2f} [{lo:.2f}, {hi:.2f}]",
    "undetected": "{a} vs {b}: no difference detected; smallest detectable {m:.2f}",
    # the smallest detectable is more than a difference of rates can be: the design tells nothing here
    "undetectable": "{a} vs {b}: no difference detected; none detectable (smallest detectable {m:.2f})",
    "constant": "{a} vs {b}: no difference detected; every pair differs by {d:.2f}",
}
# The smallest difference detectable with 80% power at two-sided 5%, per unit of the interval's half-width.
DETECTABLE_PER_HALF = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / stats.norm.ppf(0.975)


def _matrix(part: pd.DataFrame) -> pd.DataFrame:
    """seeds x items of y."""
    return part.pivot_table(index="seed", columns="item", values="y", aggfunc="mean")


def paired(a: pd.DataFrame, b: pd.DataFrame) -> dict | None:
    """a - b over the seeds and items both sides have (seeds x items frames of the same quantity): the
    estimate, its interval, p, the smallest detectable difference. None when they share no seed or item."""
    seeds, items = a.index.intersection(b.index), a.columns.intersection(b.columns)
    if not len(seeds) or not len(items):
        return None
    x, y = a.loc[seeds, items].to_numpy(float), b.loc[seeds, items].to_numpy(float)
    missing = np.isnan(x) | np.isnan(y)
    x, y, missing = (v[~missing.all(1)] for v in (x, y, missing))  # seeds one side lacks
    keep = ~missing.any(0)  # items some seed lacks
    x, y = x[:, keep], y[:, keep]
    if not x.size:
        return None
    if np.isin(x, (0, 1)).all() and np.isin(y, (0, 1)).all():
        r = inference.difference_interval(x, y)  # rates: Newcombe's paired interval when every pair agrees
    else:
        r = inference.crossed_mean(x - y)
        r["p"] = inference.t_p(r)
    half = (r["hi"] - r["lo"]) / 2 if r["hi"] > r["lo"] else np.nan  # degenerate: nothing to size it by
    return {
        "seeds": len(x),
        "items": int(keep.sum()),
        "estimate": r["estimate"],
        "lo": r["lo"],
        "hi": r["hi"],
        "ci": fmt_ci(r["lo"], r["hi"]),
        "p": r.get("p", np.nan),
        "detectable": DETECTABLE_PER_HALF * half if np.isfinite(half) else np.nan,
        "method": r["method"],
    }


def verdict(a: str, b: str, r: dict) -> str:
    """The comparison's finding in the fixed words of VERDICTS."""
    d, lo, hi, m = r["estimate"], r["lo"], r["hi"], r["detectable"]
    if lo > 0:
        return VERDICTS["exceeds"].format(x=a, y=b, d=d, lo=lo, hi=hi)
    if hi < 0:
        return VERDICTS["exceeds"].format(x=b, y=a, d=-d, lo=-hi, hi=-lo)
    kind = "constant" if np.isnan(m) else "undetectable" if m > 1 else "undetected"
    return VERDICTS[kind].format(a=a, b=b, d=d, m=m)


def _row(kind: str, where: dict, a: str, b: str, r: dict | None) -> dict | None:
    if r is None:
        return None
    return {"comparison": kind, **where, "a": a, "b": b, **r, "verdict": verdict(a, b, r)}


def _behaviour(its: pd.DataFrame) -> pd.DataFrame:
    return its[its.kind == "behaviour"]


def leak_contrasts(its: pd.DataFrame, arms: pd.DataFrame) -> list[dict]:
    """Per arm (control and IP) and epoch: each leak test prompt vs the unmodified one, and each related leak
    vs the unrelated instruction, on the same trained models."""
    b = _behaviour(its)
    runs = arms[arms.condition.isin(["control", "ip"]) & (arms.epoch > 0)]
    out = []
    for (setting, design, arm, epoch), g in runs.groupby(["setting", "design", "arm", "epoch"]):
        mine = b[b.run.isin(set(g.run)) & (b.epoch == epoch)]
        by_prompt = {tp: _matrix(part) for tp, part in mine.groupby("test_prompt")}
        leaks = sorted(tp for tp in by_prompt if prompts.LEAK in tp)
        unrelated = [tp for tp in leaks if tp.partition(prompts.LEAK)[2].startswith("unrelated")]
        where = {"setting": setting, "design": design, "arm": arm, "epoch": epoch}
        pairs = [(tp, prompts.NONE) for tp in leaks if prompts.NONE in by_prompt]
        pairs += [(tp, u) for u in unrelated for tp in leaks if tp not in unrelated]
        for first, second in pairs:
            out.append(
                _row("test prompts", where, first, second, paired(by_prompt[first], by_prompt[second]))
            )
    return [r for r in out if r]


def _cells(its: pd.DataFrame, arms: pd.DataFrame) -> dict[tuple, tuple[pd.DataFrame, pd.DataFrame]]:
    """(setting, design, arm, epoch) -> (effect, rate): seeds x items of b(control) - b(arm), each seed
    against its own matched control, and of b(arm). IP arms only (a PTST arm is the control's models)."""
    y = _behaviour(its).set_index(["run", "epoch", "test_prompt", "item"]).y.sort_index()
    out = {}
    ip = arms[(arms.condition == "ip") & (arms.epoch > 0) & arms.control_run.notna()]
    for key, g in ip.groupby(["setting", "design", "arm", "epoch"]):
        effect, rate = {}, {}
        for ev in g.itertuples():
            try:
                arm = y.loc[(ev.run, ev.epoch, ev.test_prompt)].groupby(level=0).mean()
                ctrl = y.loc[(ev.control_run, ev.epoch, prompts.NONE)].groupby(level=0).mean()
            except KeyError:
                continue
            effect[ev.seed], rate[ev.seed] = ctrl - arm, arm
        if effect:
            out[key] = (pd.DataFrame(effect).T.sort_index(), pd.DataFrame(rate).T.sort_index())
    return out


def effect_difference(a: tuple, b: tuple, same_control: bool) -> dict | None:
    """effect(a) - effect(b), paired by seed and item. Within a design both effects have the same control,
    which cancels: the difference is b(b's arm) - b(a's arm), a difference of rates."""
    return paired(b[1], a[1]) if same_control else paired(a[0], b[0])


def axis_contrasts(cells: dict[tuple, tuple], arms: pd.DataFrame) -> list[dict]:
    """An arm's effect across the designs of a research axis, each vs the first design; and within a design,
    a prompt's variants (paraphrase bank, placement) vs its first."""
    out = []
    frame = pd.DataFrame([{"setting": s, "design": d, "arm": a, "epoch": e} for s, d, a, e in cells])
    if frame.empty:
        return out
    axes = arms.drop_duplicates("design").set_index("design")[[a for a in AXES if a in arms]]

    def label(design: str, varying: list[str]) -> str:
        return " ".join(f"{a}={axes.loc[design, a]}" for a in varying)

    for (setting, arm, epoch), g in frame.groupby(["setting", "arm", "epoch"]):
        designs = sorted(g.design, key=lambda d: tuple(str(v) for v in axes.loc[d]))
        varying = [a for a in axes if axes.loc[designs, a].astype(str).nunique() > 1]
        first = designs[0]
        for other in designs[1:]:
            r = effect_difference(
                cells[(setting, other, arm, epoch)], cells[(setting, first, arm, epoch)], False
            )
            where = {"setting": setting, "design": other, "arm": arm, "epoch": epoch}
            a, b = (f"effect of {arm} at {label(d, varying)}" for d in (other, first))
            out.append(_row("axis", where, a, b, r))
    prompt_of = arms.drop_duplicates("arm").set_index("arm").prompt
    for (setting, design, epoch), g in frame.groupby(["setting", "design", "epoch"]):
        for _, same in g.groupby(g.arm.map(prompt_of)):
            variants = sorted(same.arm, key=lambda a: (len(a), a))  # the plain prompt (shortest name) first
            for other in variants[1:]:
                r = effect_difference(
                    cells[(setting, design, other, epoch)], cells[(setting, design, variants[0], epoch)], True
                )
                where = {"setting": setting, "design": design, "arm": other, "epoch": epoch}
                out.append(_row("variant", where, f"effect of {other}", f"effect of {variants[0]}", r))
    return [r for r in out if r]


def declared_contrasts(cells: dict[tuple, tuple], declared: list[str]) -> list[dict]:
    """Each declared contrast in every (setting, design, epoch) that has all of its arms: the weighted sum of
    their effects per (seed, item), over the seeds and items all of them have."""
    by_design: dict[tuple, dict] = {}
    for (setting, design, arm, epoch), cell in cells.items():
        by_design.setdefault((setting, design, epoch), {})[arm] = cell
    out = []
    for text in declared:
        terms = parse(text)
        for (setting, design, epoch), have in by_design.items():
            if not all(arm in have for _, arm in terms):
                continue
            where = {"setting": setting, "design": design, "arm": "", "epoch": epoch}
            if len(terms) == 2 and sorted(w for w, _ in terms) == [-1, 1]:
                (_, a), (_, b) = sorted(terms, reverse=True)
                out.append(
                    _row(
                        "declared",
                        where,
                        f"effect of {a}",
                        f"effect of {b}",
                        effect_difference(have[a], have[b], True),
                    )
                )
                continue
            if [w for w, _ in terms] == [1, -1, -1, 1]:  # a 2x2's interaction: one difference vs another
                (_, a), (_, b), (_, c), (_, d) = terms
                first, second = (a, b), (c, d)
                r = paired(have[a][0] - have[b][0], have[c][0] - have[d][0])
                names = [f"(effect of {x} - effect of {y})" for x, y in (first, second)]
            else:
                side = {
                    sign: sum(abs(w) * have[arm][0] for w, arm in terms if np.sign(w) == sign)
                    for sign in (1, -1)
                }
                r = paired(side[1], side[-1])
                names = [
                    "("
                    + " + ".join(f"{abs(w):g} x effect of {arm}" for w, arm in terms if np.sign(w) == sign)
                    + ")"
                    for sign in (1, -1)
                ]
            out.append(_row("declared", where, *names, r))
    return [r for r in out if r]


def comparison_table(its: pd.DataFrame, arms: pd.DataFrame, declared: list[str] = ()) -> pd.DataFrame:
    """Every paired comparison of an analysis (see the module's docstring), one row each."""
    if its.empty or arms.empty:
        return pd.DataFrame()
    cells = _cells(its, arms)
    rows = declared_contrasts(cells, list(declared)) + axis_contrasts(cells, arms) + leak_contrasts(its, arms)
    return pd.DataFrame(rows)
