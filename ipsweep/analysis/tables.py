"""The statistical tables of an analysis, each from the frames: conditions, effects, leaks, frontier,
behaviour per test prompt (correlations and power: prediction.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ipsweep import prompts
from ipsweep.analysis import inference
from ipsweep.analysis.frames import (
    ARM_ORDER,
    AXES,
    arm_name,
    by_evaluation,
    design_key,
    outcomes,
    seeds_by_items,
    shared_items,
)
from ipsweep.config import ESTIMATORS
from ipsweep.stats import wilson


def fmt_ci(lo, hi) -> str:
    return f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else ""


def arm_order(a: str) -> int:
    return -1 if a == "base" else ARM_ORDER.get(a.split(":")[0], len(ARM_ORDER))


def condition_table(arms: pd.DataFrame, its: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Behaviour and capability per setting, design, arm and epoch (and per `by`, e.g. eval_set and group):
    the mean over seeds x items with a 95% CI that counts both (stats.rate_interval). Epoch 0 is the
    untrained model, once, as arm `base`."""
    if arms.empty:
        return pd.DataFrame()
    evals = by_evaluation(its)
    # the untrained model under the unmodified prompt: the same in every run of a design (any arm holds it)
    base = arms[(arms.epoch == 0) & (arms.test_prompt == prompts.NONE)].drop_duplicates(["setting", "design"])
    groups = [((s, d, "base", 0), g.iloc[:1]) for (s, d), g in base.groupby(["setting", "design"])]
    groups += list(arms[arms.epoch > 0].groupby(["setting", "design", "arm", "epoch"]))
    cells: dict[tuple, dict] = {}
    pools: dict[tuple, list] = {}  # per design, epoch, metric and subgroup: the trained arms' matrices
    pending = []
    for (setting, design, a, epoch), g in groups:
        head = {
            "setting": setting,
            "model": g.model.iloc[0],
            "design": design,
            **{ax: g[ax].iloc[0] for ax in AXES if ax in g},
            "arm": a,
            "epoch": epoch,
            "seeds": g.seed.nunique() if a != "base" else 0,
        }
        for kind in ("behaviour", "capability"):
            part = shared_items(evals, g, kind)
            if part is None:
                continue
            for sub_key, sub in part.groupby(list(by)) if by else [((), part)]:
                sub_key = sub_key if isinstance(sub_key, tuple) else (sub_key,)
                row = cells.setdefault(
                    (setting, design, a, epoch, *sub_key), {**head, **dict(zip(by, sub_key))}
                )
                m = seeds_by_items(sub, sorted(set(sub.item)))
                key = (setting, design, epoch, kind, *sub_key)
                # the untrained model has no seeds; a PTST arm is the control's runs tested another way
                trained = a != "base" and g.condition.iloc[0] in ("control", "ip")
                if trained:
                    pools.setdefault(key, []).append(m)
                pending.append((row, kind, sub, m, None if a == "base" else key))
    pooled = {key: inference.pooled_seed_variance(runs) for key, runs in pools.items()}
    for row, kind, sub, m, key in pending:
        r = inference.rate_interval(m, pooled.get(key))
        row.update(
            {
                f"{kind}_metric": sub.metric.iloc[0],
                kind: r["estimate"],
                f"{kind}_lo": r["lo"],
                f"{kind}_hi": r["hi"],
                f"{kind}_ci": fmt_ci(r["lo"], r["hi"]),
                f"{kind}_k/n": f"{int(sub.k.sum())}/{int(sub.n.sum())}",
                f"{kind}_items": sub.item.nunique(),
                f"{kind}_method": r["method"],
                # two of its variance components apart: the seed part, and eval reruns (samples per item)
                f"{kind}_seed_se": float(np.sqrt(r["var_seed"])) if "var_seed" in r else np.nan,
                f"{kind}_rerun_se": inference.rerun_se(sub.k, sub.n),
            }
        )
    table = pd.DataFrame(list(cells.values()))
    return (
        table.assign(_o=table.arm.map(arm_order))
        .sort_values(["setting", "design", "_o", "arm", "epoch", *by])
        .drop(columns="_o")
        .reset_index(drop=True)
    )


def effect_table(arms: pd.DataFrame, its: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per arm and epoch: effect = b(control) - b(arm) and capability cost = c(control) - c(arm), paired by
    seed (the control with the arm's identity) and item; crossed seeds x items 95% CI, p-value, Holm-adjusted
    p within (setting, design, epoch), and the seed-level t-interval beside it. Also returns per-seed
    values."""
    if arms.empty:
        return pd.DataFrame(), pd.DataFrame()
    evals = by_evaluation(its)
    control_eval = {(r.control_run, r.epoch): r for r in arms[arms.condition == "control"].itertuples()}
    out, per_seed = [], []
    # first every arm's matrices, then their intervals with the seed variance pooled per design and epoch
    pools: dict[tuple, dict] = {}
    pending = []
    for (setting, design, a, epoch), g in arms[(arms.condition != "control") & (arms.epoch > 0)].groupby(
        ["setting", "design", "arm", "epoch"]
    ):
        row = {
            "setting": setting,
            "model": g.model.iloc[0],
            "design": design,
            "arm": a,
            "condition": g.condition.iloc[0],
            "prompt": g.prompt.iloc[0],
            "role": g.role.iloc[0],
            "epoch": epoch,
            "variant": g.variant.iloc[0],
            **{f"elicit_{e}": g[f"elicit_{e}"].iloc[0] for e in ESTIMATORS},
            **{a: g[a].iloc[0] for a in (*AXES, "paraphrases") if a in g},
            "texts_trained": _span(g.get("texts_trained")),
        }
        pairs = [(ev, control_eval.get((ev.control_run, ev.epoch))) for ev in g.itertuples()]
        pairs = [(ev, c) for ev, c in pairs if c is not None]
        row["seeds"] = len(pairs)
        if not pairs:
            out.append(row)  # no matched control: effect unknown
            continue
        shared = {
            k: row[k]
            for k in (
                "setting",
                "design",
                "arm",
                "condition",
                "prompt",
                "role",
                "epoch",
                *(f"elicit_{e}" for e in ESTIMATORS),
            )
        }
        seed_rows = {ev.seed: {**shared, "seed": ev.seed} for ev, _ in pairs}
        for kind, name in (("behaviour", "effect"), ("capability", "capability_cost")):
            sides = [
                (ev, c_out, a_out)
                for ev, c in pairs
                if (c_out := outcomes(evals, c, kind)) is not None
                and (a_out := outcomes(evals, ev, kind)) is not None
            ]
            if not sides:
                continue
            ids = sorted(set.intersection(*(set(c.item) & set(x.item) for _, c, x in sides)))
            ctrl = seeds_by_items(pd.concat([c for _, c, _ in sides]), ids)
            armm = seeds_by_items(pd.concat([x for _, _, x in sides]), ids)
            key = (setting, design, epoch, kind)
            runs = pools.setdefault(key, {})
            if ctrl.size > runs.get("control", np.empty(0)).size:
                runs["control"] = ctrl
            if row["condition"] == "ip":  # a PTST arm is the control's runs, tested another way
                runs[a] = armm
            seeds = (ctrl - armm).mean(axis=1)
            pending.append((row, name, key, ctrl, armm, seeds))
            for (ev, _, _), v in zip(sides, seeds):
                seed_rows[ev.seed][name] = float(v)
        out.append(row)
        per_seed += list(seed_rows.values())
    pooled = {key: inference.pooled_seed_variance(list(runs.values())) for key, runs in pools.items()}
    for row, name, key, ctrl, armm, seeds in pending:
        # PTST's control and arm are the same runs: its per-arm interval keeps that pairing
        shared = pooled[key] if row["condition"] == "ip" else None
        r = inference.difference_interval(ctrl, armm, shared)
        slo, shi = inference.seed_t_interval(seeds)
        row.update(
            {
                name: r["estimate"],
                f"{name}_lo": r["lo"],
                f"{name}_hi": r["hi"],
                f"{name}_ci": fmt_ci(r["lo"], r["hi"]),
                f"{name}_se": r.get("se"),
                f"{name}_p": r.get("p"),
                f"{name}_method": r["method"],
                f"{name}_seed_ci": fmt_ci(slo, shi),
                # the design's seed sd on the logit scale (what `ipsweep power --pilot` plans with)
                f"{name}_pooled_seed_sd": np.sqrt(shared["var"]) if shared else np.nan,
                "items": ctrl.shape[1],
            }
        )
    table = pd.DataFrame(out)
    if table.empty:  # only controls: nothing to compare
        return table, pd.DataFrame(per_seed)
    if "effect_p" in table:
        by_epoch = table.groupby(["setting", "design", "epoch"])
        table["effect_p_holm"] = by_epoch.effect_p.transform(inference.holm)
    table = table.assign(_o=table.arm.map(arm_order)).sort_values(["setting", "design", "_o", "arm", "epoch"])
    return table.drop(columns="_o").reset_index(drop=True), pd.DataFrame(per_seed)


def _span(values) -> str | None:
    """'5', or '4-5' where the seeds differ; None where nothing was recorded (the control, older records)."""
    if values is None:
        return None
    v = sorted({int(x) for x in values.dropna()})
    return None if not v else str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"


def varying_axes(table: pd.DataFrame) -> list[str]:
    """The research axes (and the paraphrase bank) that take more than one value in `table`."""
    return [a for a in (*AXES, "paraphrases") if a in table and table[a].astype(str).nunique() > 1]


def axes_table(effects: pd.DataFrame) -> pd.DataFrame:
    """Effect and capability cost of each IP arm at each value of the research axes the analysis varies
    (flawed share, update method, LoRA rank and targets, paraphrase bank), with how many distinct prompt texts
    its runs trained on: the effect-vs-axis curves in one table. Empty when no axis varies."""
    if effects.empty or not (axes := varying_axes(effects)):
        return pd.DataFrame()
    t = effects[effects.condition == "ip"]
    cols = ["setting", *axes, "prompt", "arm", "epoch", "seeds", "texts_trained"]
    cols += [c for c in ("effect", "effect_lo", "effect_hi", "effect_ci", "capability_cost") if c in t]
    cols += [c for c in ("capability_cost_lo", "capability_cost_hi", "capability_cost_ci") if c in t]
    return t[cols].sort_values(["setting", "prompt", *axes, "epoch"]).reset_index(drop=True)


def design_labels(effects: pd.DataFrame) -> dict[str, str]:
    """Each design by the values of the axes that vary between the designs of the analysis ('' for one)."""
    if effects.empty:
        return {}
    first = effects.drop_duplicates("design")
    axes = [a for a in varying_axes(first) if a in AXES]  # the paraphrase bank is an arm's, not a design's
    return {r["design"]: " ".join(f"{a}={r[a]}" for a in axes) for _, r in first.iterrows()}


def trajectory_table(effects: pd.DataFrame, correlations: pd.DataFrame) -> pd.DataFrame:
    """Over training, in one table: each arm's effect at every epoch, and each elicitation estimator's
    correlation with the effects across the IP-style prompts (Spearman) at every epoch, per setting and
    design. One row per series and epoch; the report shows it with a column per epoch."""
    if effects.empty or "effect" not in effects:
        return pd.DataFrame()
    labels = design_labels(effects)
    rows = [
        {
            "setting": r.setting,
            "design": r.design,
            "axis_values": labels.get(r.design, ""),
            "series": r.arm,
            "epoch": r.epoch,
            "estimate": r.effect,
            "lo": r.effect_lo,
            "hi": r.effect_hi,
        }
        for r in effects.dropna(subset=["effect"]).itertuples()
    ]
    if not correlations.empty:
        c = correlations[(correlations.prompts == "IP-style prompts") & correlations.spearman.notna()]
        for r in c.itertuples():
            variant = f" {r.variant}" if isinstance(r.variant, str) and r.variant else ""
            rows.append(
                {
                    "setting": r.setting,
                    "design": r.design,
                    "axis_values": labels.get(r.design, ""),
                    "series": f"spearman({r.estimator}, effect){variant}, {r.points} prompts",
                    "epoch": r.epoch,
                    "estimate": r.spearman,
                    "lo": r.spearman_lo,
                    "hi": r.spearman_hi,
                }
            )
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows)
    t["ci"] = [fmt_ci(lo, hi) for lo, hi in zip(t.lo, t.hi)]
    t = t.assign(_o=t.series.map(arm_order)).sort_values(["setting", "axis_values", "_o", "series", "epoch"])
    return t.drop(columns="_o").reset_index(drop=True)


def leak_table(records: list[dict], its: pd.DataFrame) -> pd.DataFrame:
    """Behaviour of each arm under the leak test prompts (`<prompt>~negation`, `~keywords`, `~heldout`):
    per setting, design, arm, test prompt and epoch, mean over seeds x items with the 95% CI of the
    condition table; the untrained model once per design (`base`, epoch 0); the control under the same
    prompts is each leak's baseline. Does the inoculated behaviour come back under a related prompt?"""
    rows = []
    for r in records:
        for epoch, entry in r["epochs"].items():
            for test_prompt in entry["evals"]:
                if prompts.LEAK in test_prompt:
                    rows.append(
                        {
                            "setting": r["setting"],
                            "model": r["model"],
                            "design": design_key(r),
                            "arm": "base" if epoch == "0" else arm_name(r),
                            "test_prompt": test_prompt,
                            "seed": r["seed"] if epoch != "0" else -1,
                            "epoch": int(epoch),
                            "run": Path(r["run_dir"]).name,
                        }
                    )
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).drop_duplicates(["setting", "design", "arm", "test_prompt", "epoch", "seed"])
    evals, out = by_evaluation(its), []
    for (setting, design, a, test_prompt, epoch), g in frame.groupby(
        ["setting", "design", "arm", "test_prompt", "epoch"]
    ):
        part = shared_items(evals, g, "behaviour")
        if part is None:
            continue
        ids = sorted(set(part.item))
        r = inference.rate_interval(seeds_by_items(part, ids))
        prompt, _, kind = test_prompt.partition(prompts.LEAK)
        kind = kind.partition("@")[0]  # a moved prompt's leak tests: the arm's name says where
        out.append(
            {
                "setting": setting,
                "model": g.model.iloc[0],
                "design": design,
                "arm": a,
                "epoch": epoch,
                "leak_of": prompt,
                "leak": kind,
                "test_prompt": test_prompt,
                "seeds": g.seed.nunique() if a != "base" else 0,
                "behaviour_metric": part.metric.iloc[0],
                "behaviour": r["estimate"],
                "behaviour_lo": r["lo"],
                "behaviour_hi": r["hi"],
                "behaviour_ci": fmt_ci(r["lo"], r["hi"]),
                "items": len(ids),
            }
        )
    table = pd.DataFrame(out)
    return (
        table.assign(_o=table.arm.map(arm_order))
        .sort_values(["setting", "design", "leak_of", "leak", "_o", "arm", "epoch"])
        .drop(columns="_o")
        .reset_index(drop=True)
    )


def frontier_table(conditions: pd.DataFrame) -> pd.DataFrame:
    """The condition table with `on_frontier`: per setting, design and epoch, a trained arm (control, IP,
    PTST) is on the capability vs behaviour frontier when no other trained arm of that epoch has both less
    behaviour and more capability, one of them strictly. The untrained model (`base`) is shown beside them
    as the reference, not a candidate: no fine-tuning recipe yields it. Point estimates; CIs beside them."""
    if conditions.empty or "capability" not in conditions or "behaviour" not in conditions:
        return pd.DataFrame()
    out = []
    for _, g in conditions.groupby(["setting", "design"]):
        base = g[g.arm == "base"]
        for epoch in sorted(e for e in g.epoch.unique() if e > 0):
            arms = g[g.epoch == epoch].dropna(subset=["behaviour", "capability"])
            b, c = arms.behaviour.to_numpy(float), arms.capability.to_numpy(float)
            arms = arms.assign(
                on_frontier=[
                    not any((b <= b[i]) & (c >= c[i]) & ((b < b[i]) | (c > c[i]))) for i in range(len(arms))
                ]
            )
            out.append(pd.concat([base.assign(on_frontier=False), arms]).assign(panel=epoch))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def capability_by_behaviour_table(its: pd.DataFrame) -> pd.DataFrame:
    """Per setting, design and epoch: the capability rate of the trained models' replies that show the
    behaviour and of those that do not (unmodified test prompt, one sample per item, every arm and seed
    pooled). Where the two differ, a capability cost partly re-measures the behaviour (e.g. answers in
    capitals that are less often correct). Descriptive: the replies share items and runs, so the Wilson
    intervals beside each rate treat dependent replies as independent and are too narrow."""
    headline = its[(its.test_prompt == prompts.NONE) & (its.epoch > 0) & (its.n == 1)]
    if headline.empty or headline.kind.nunique() < 2:
        return pd.DataFrame()
    wide = headline.pivot_table(
        index=["setting", "design", "epoch", "run", "item"], columns="kind", values="y", aggfunc="first"
    ).dropna()
    rows = []
    for (setting, design, epoch), g in wide.groupby(level=["setting", "design", "epoch"]):
        row = {"setting": setting, "design": design, "epoch": epoch}
        for label, part in (("with", g[g.behaviour == 1]), ("without", g[g.behaviour == 0])):
            k, n = int(part.capability.sum()), len(part)
            lo, hi = wilson(k, n) if n else (np.nan, np.nan)
            row |= {
                f"replies_{label}": n,
                f"capability_{label}": k / n if n else np.nan,
                f"capability_{label}_ci": fmt_ci(lo, hi),
                f"capability_{label}_k/n": f"{k}/{n}",
            }
        rows.append(row)
    return pd.DataFrame(rows)


def test_prompt_table(df: pd.DataFrame) -> pd.DataFrame:
    """Behaviour of every trained arm under each test-time prompt (does the behaviour come back on
    request?)."""
    b = df[(df.kind == "behaviour") & (df.epoch > 0)]
    if b.test_prompt.nunique() < 2:
        return pd.DataFrame()
    g = (
        b.groupby(["setting", "arm", "epoch", "test_prompt"])
        .agg(k=("k", "sum"), n=("n", "sum"))
        .reset_index()
    )
    g["behaviour"] = g.k / g.n
    return g.pivot_table(
        index=["setting", "arm", "epoch"], columns="test_prompt", values="behaviour"
    ).reset_index()
