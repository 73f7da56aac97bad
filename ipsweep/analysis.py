"""Read a sweep's run records and build the tables, plot and report. Reads records only, never logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ipsweep import prompts, store
from ipsweep import stats as st
from ipsweep.config import ESTIMATORS
from ipsweep.errors import ConfigError

ARM_ORDER = {"control": 0, "ip": 1, "ptst": 2}


def arm(record: dict) -> str:
    """Display name of a run's condition: control, ip:<prompt>, with [mixed] for a paraphrase mix and
    @<placement> where the sweep moved the prompt from the library's placement."""
    return (
        "control"
        if record["condition"] == "control"
        else f"{record['condition']}:{record['prompt']}{variant(record)}"
    )


def variant(record: dict) -> str:
    """How an IP run's prompt was trained, when not as the library has it: [mixed] (paraphrase mix),
    @<placement> (moved). Correlations are computed within a variant."""
    if record["condition"] != "ip":
        return ""
    mixed = "[mixed]" if record.get("prompt_mode") == "mixed" else ""
    return mixed + (f"@{record['placement_override']}" if record.get("placement_override") else "")


def match_key(record: dict) -> str:
    """What an arm and its control share: the run's whole semantic config except the training prompt."""
    return store.digest(store.without(record["config"], "prompt"))


def design_key(record: dict) -> str:
    """What the seeds of one arm share: the config except the training prompt and the seed."""
    return store.digest(store.without(record["config"], "prompt", "train.seed"))


def headline_evaluations(record: dict) -> list[tuple[str, str, str, str, str]]:
    """(arm, condition, prompt, role, test prompt) for each arm this record measures: an IP run under the
    unmodified test prompt; a control under it (the control) and under each safety prompt it was tested
    with (PTST: the same trained model, the safety prompt inserted at test time)."""
    if record["condition"] != "control":
        return [(arm(record), record["condition"], record["prompt"], record["role"], prompts.NONE)]
    out = [("control", "control", prompts.NONE, "none", prompts.NONE)]
    for name, role in record.get("test_prompt_roles", {}).items():
        if role == "safety":
            out.append((f"ptst:{name}", "ptst", name, "safety", name))
    return out


def items(records: list[dict]) -> pd.DataFrame:
    """One row per run x epoch x test prompt x metric x eval item: y = share of the item's samples that
    show the metric. Paired comparisons join on `item`."""
    rows = []
    for r in records:
        mk, dk = match_key(r), design_key(r)
        for epoch, entry in r["epochs"].items():
            for test_prompt, ev in entry["evals"].items():
                for it in ev.get("items", []):
                    for metric in (r["behaviour_metric"], r["capability_metric"]):
                        if metric not in it or not it[metric][1]:
                            continue
                        k, n = it[metric]
                        rows.append(
                            {
                                "setting": r["setting"],
                                "model": r["model"],
                                "design": dk,
                                "match": mk,
                                "run": Path(r["run_dir"]).name,
                                "condition": r["condition"],
                                "prompt": r["prompt"],
                                "seed": r["seed"],
                                "epoch": int(epoch),
                                "test_prompt": test_prompt,
                                "kind": "behaviour" if metric == r["behaviour_metric"] else "capability",
                                "metric": metric,
                                "item": it["id"],
                                "eval_set": it.get("eval_set"),
                                "group": it.get("group"),
                                "k": k,
                                "n": n,
                                "y": k / n,
                            }
                        )
    return pd.DataFrame(rows)


def tidy(records: list[dict]) -> pd.DataFrame:
    """One row per run x epoch x test prompt x metric, with counts (pooled Wilson CIs: per-evaluation
    only)."""
    rows = []
    for r in records:
        for epoch, entry in r["epochs"].items():
            for test_prompt, ev in entry["evals"].items():
                for metric, m in ev["metrics"].items():
                    rows.append(
                        {
                            "sweep": r.get("sweep"),
                            "setting": r["setting"],
                            "model": r["model"],
                            "arm": arm(r),
                            "condition": r["condition"],
                            "prompt": r["prompt"],
                            "role": r["role"],
                            "seed": r["seed"],
                            "signature": r["signature"],
                            "design": design_key(r),
                            "status": r["status"],
                            "epoch": int(epoch),
                            "test_prompt": test_prompt,
                            "metric": metric,
                            "kind": "behaviour"
                            if metric == r["behaviour_metric"]
                            else "capability"
                            if metric == r["capability_metric"]
                            else "other",
                            "loss": entry.get("loss"),
                            **m,
                        }
                    )
    return pd.DataFrame(rows)


def check_controls(records: list[dict]) -> None:
    """Each arm has at most one control with its identity; two are an error that names both runs."""
    seen: dict[str, str] = {}
    for r in records:
        if r["condition"] != "control":
            continue
        key = match_key(r)
        if key in seen and seen[key] != r["run_dir"]:
            raise ConfigError(
                f"two control runs match the same arms: {seen[key]} and {r['run_dir']} (same setting, model, "
                "seed and hyper-parameters); fix: analyse one of the sweeps that hold them, or remove the "
                "duplicate run"
            )
        seen[key] = r["run_dir"]


def _by_evaluation(its: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """The items table split by evaluation: (run, epoch, test prompt, kind) -> its item rows."""
    return {key: g for key, g in its.groupby(["run", "epoch", "test_prompt", "kind"], sort=False)}


def _outcomes(evals: dict[tuple, pd.DataFrame], ev, kind: str) -> pd.DataFrame | None:
    """The item rows of arm evaluation `ev` (a row of arm_evaluations) for `kind`, or None if not
    evaluated."""
    return evals.get((ev.run, ev.epoch, ev.test_prompt, kind))


def _shared_items(evals: dict[tuple, pd.DataFrame], rows: pd.DataFrame, kind: str) -> pd.DataFrame | None:
    """The item rows of the evaluations in `rows` (arm_evaluations-shaped) for `kind`, kept to the items
    every one of them scored; None if none was evaluated."""
    parts = [p for ev in rows.itertuples() if (p := _outcomes(evals, ev, kind)) is not None]
    if not parts:
        return None
    ids = set.intersection(*(set(p.item) for p in parts))
    part = pd.concat(parts)
    return part[part.item.isin(ids)]


def _matrix(part: pd.DataFrame, item_ids) -> np.ndarray:
    """seeds x items matrix of y for the given items (rows: seeds in order)."""
    wide = part.pivot_table(index="seed", columns="item", values="y", aggfunc="mean")
    return wide.reindex(columns=list(item_ids)).to_numpy()


def recorded_elicitation(record: dict) -> dict:
    """A run's elicitation estimates by estimator. Before run signature v4, `logprob` was the non-contrastive
    estimator that is now called `logprob_train`: old records are read under that name."""
    el = dict(record.get("elicitation") or {})
    if (record.get("config") or {}).get("signature_version", store.SIGNATURE_VERSION) < 4 and "logprob" in el:
        el["logprob_train"] = el.pop("logprob")
    return el


def arm_evaluations(records: list[dict]) -> pd.DataFrame:
    """One row per (arm, seed, epoch): which run and test prompt measure it, and its control's run."""
    controls = {match_key(r): r for r in records if r["condition"] == "control"}
    rows = []
    for r in records:
        for a, cond, prompt, role, test_prompt in headline_evaluations(r):
            ctrl = controls.get(match_key(r))
            for epoch, entry in r["epochs"].items():
                if test_prompt not in entry["evals"] or not entry["evals"][test_prompt].get("items"):
                    continue
                el = recorded_elicitation(r) if cond == "ip" else {}
                rows.append(
                    {
                        "setting": r["setting"],
                        "model": r["model"],
                        "design": design_key(r),
                        "arm": a,
                        "variant": variant(r),
                        "condition": cond,
                        "prompt": prompt,
                        "role": role,
                        "seed": r["seed"],
                        "epoch": int(epoch),
                        "run": Path(r["run_dir"]).name,
                        "test_prompt": test_prompt,
                        "control_run": Path(ctrl["run_dir"]).name if ctrl else None,
                        **{f"elicit_{e}": el.get(e, {}).get("estimate") for e in ESTIMATORS},
                    }
                )
    return pd.DataFrame(rows)


def _fmt_ci(lo, hi) -> str:
    return f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else ""


def _arm_order(a: str) -> int:
    return -1 if a == "base" else ARM_ORDER.get(a.split(":")[0], len(ARM_ORDER))


def condition_table(arms: pd.DataFrame, its: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Behaviour and capability per setting, design, arm and epoch (and per `by`, e.g. eval_set and group):
    the mean over seeds x items with a 95% CI that counts both (stats.rate_interval). Epoch 0 is the
    untrained model, once, as arm `base`."""
    if arms.empty:
        return pd.DataFrame()
    evals = _by_evaluation(its)
    # the untrained model under the unmodified prompt: the same in every run of a design (any arm holds it)
    base = arms[(arms.epoch == 0) & (arms.test_prompt == prompts.NONE)].drop_duplicates(["setting", "design"])
    groups = [((s, d, "base", 0), g.iloc[:1]) for (s, d), g in base.groupby(["setting", "design"])]
    groups += list(arms[arms.epoch > 0].groupby(["setting", "design", "arm", "epoch"]))
    cells: dict[tuple, dict] = {}
    for (setting, design, a, epoch), g in groups:
        head = {
            "setting": setting,
            "model": g.model.iloc[0],
            "design": design,
            "arm": a,
            "epoch": epoch,
            "seeds": g.seed.nunique() if a != "base" else 0,
        }
        for kind in ("behaviour", "capability"):
            part = _shared_items(evals, g, kind)
            if part is None:
                continue
            for sub_key, sub in part.groupby(list(by)) if by else [((), part)]:
                sub_key = sub_key if isinstance(sub_key, tuple) else (sub_key,)
                row = cells.setdefault(
                    (setting, design, a, epoch, *sub_key), {**head, **dict(zip(by, sub_key))}
                )
                r = st.rate_interval(_matrix(sub, sorted(set(sub.item))))
                row.update(
                    {
                        f"{kind}_metric": sub.metric.iloc[0],
                        kind: r["estimate"],
                        f"{kind}_lo": r["lo"],
                        f"{kind}_hi": r["hi"],
                        f"{kind}_ci": _fmt_ci(r["lo"], r["hi"]),
                        f"{kind}_k/n": f"{int(sub.k.sum())}/{int(sub.n.sum())}",
                        f"{kind}_items": sub.item.nunique(),
                        f"{kind}_method": r["method"],
                    }
                )
    table = pd.DataFrame(list(cells.values()))
    return (
        table.assign(_o=table.arm.map(_arm_order))
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
    evals = _by_evaluation(its)
    control_eval = {(r.control_run, r.epoch): r for r in arms[arms.condition == "control"].itertuples()}
    out, per_seed = [], []
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
                if (c_out := _outcomes(evals, c, kind)) is not None
                and (a_out := _outcomes(evals, ev, kind)) is not None
            ]
            if not sides:
                continue
            ids = sorted(set.intersection(*(set(c.item) & set(x.item) for _, c, x in sides)))
            ctrl = _matrix(pd.concat([c for _, c, _ in sides]), ids)
            armm = _matrix(pd.concat([x for _, _, x in sides]), ids)
            r = st.difference_interval(ctrl, armm)
            seeds = (ctrl - armm).mean(axis=1)
            slo, shi = st.seed_t_interval(seeds)
            row.update(
                {
                    name: r["estimate"],
                    f"{name}_lo": r["lo"],
                    f"{name}_hi": r["hi"],
                    f"{name}_ci": _fmt_ci(r["lo"], r["hi"]),
                    f"{name}_se": r.get("se"),
                    f"{name}_p": r.get("p"),
                    f"{name}_method": r["method"],
                    f"{name}_seed_ci": _fmt_ci(slo, shi),
                    "items": len(ids),
                }
            )
            for (ev, _, _), v in zip(sides, seeds):
                seed_rows[ev.seed][name] = float(v)
        out.append(row)
        per_seed += list(seed_rows.values())
    table = pd.DataFrame(out)
    if table.empty:  # only controls: nothing to compare
        return table, pd.DataFrame(per_seed)
    if "effect_p" in table:
        table["effect_p_holm"] = table.groupby(["setting", "design", "epoch"]).effect_p.transform(st.holm)
    table = table.assign(_o=table.arm.map(_arm_order)).sort_values(
        ["setting", "design", "_o", "arm", "epoch"]
    )
    return table.drop(columns="_o").reset_index(drop=True), pd.DataFrame(per_seed)


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
                            "arm": "base" if epoch == "0" else arm(r),
                            "test_prompt": test_prompt,
                            "seed": r["seed"] if epoch != "0" else -1,
                            "epoch": int(epoch),
                            "run": Path(r["run_dir"]).name,
                        }
                    )
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).drop_duplicates(["setting", "design", "arm", "test_prompt", "epoch", "seed"])
    evals, out = _by_evaluation(its), []
    for (setting, design, a, test_prompt, epoch), g in frame.groupby(
        ["setting", "design", "arm", "test_prompt", "epoch"]
    ):
        part = _shared_items(evals, g, "behaviour")
        if part is None:
            continue
        ids = sorted(set(part.item))
        r = st.rate_interval(_matrix(part, ids))
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
                "behaviour_ci": _fmt_ci(r["lo"], r["hi"]),
                "items": len(ids),
            }
        )
    table = pd.DataFrame(out)
    return (
        table.assign(_o=table.arm.map(_arm_order))
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


def plot_frontier(frontier: pd.DataFrame, path: Path) -> Path | None:
    """Capability (y) vs behaviour (x) per epoch, 95% CIs on both axes, frontier arms ringed and joined."""
    if frontier.empty:
        return None
    plt = pyplot()
    panels = list(frontier.groupby(["setting", "design", "panel"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, ((setting, _, epoch), t) in zip(axes[0], panels):
        for row in t.itertuples():
            xerr = [[max(row.behaviour - row.behaviour_lo, 0)], [max(row.behaviour_hi - row.behaviour, 0)]]
            yerr = [
                [max(row.capability - row.capability_lo, 0)],
                [max(row.capability_hi - row.capability, 0)],
            ]
            style = (
                dict(marker="s", color="black")
                if row.arm == "base"
                else dict(marker="D", color="grey")
                if row.arm == "control"
                else dict(marker="o")
            )
            ax.errorbar(
                row.behaviour,
                row.capability,
                xerr=xerr,
                yerr=yerr,
                capsize=2,
                linestyle="none",
                label=row.arm,
                markersize=7 if row.on_frontier else 5,
                markeredgecolor="red" if row.on_frontier else None,
                **style,
            )
        edge = t[t.on_frontier].sort_values("behaviour")
        ax.plot(edge.behaviour, edge.capability, color="red", linewidth=1, alpha=0.6)
        ax.set_title(
            f"{setting}, epoch {epoch} (red: frontier of the trained arms; base = untrained)", fontsize=9
        )
        ax.set_xlabel(f"behaviour: {t.behaviour_metric.dropna().iloc[0]} (lower is better)")
        ax.set_ylabel(f"capability: {t.capability_metric.dropna().iloc[0]} (higher is better)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _se_from_ci(lo, hi) -> float:
    return (
        (hi - lo) / (2 * st.Z95)
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
        else np.nan
    )


def correlation_table(
    effects: pd.DataFrame, elicitation: pd.DataFrame, n_permutations: int = 9999, reference_r: float = 0.57
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Elicitation vs inoculation effect, one point per IP-style prompt, per setting, epoch and estimator,
    for every IP-style prompt and for the inoculation-role ones alone; then pooled across settings as a
    random-effects meta-analysis of Fisher z. Returns (correlations, leave-one-prompt-out influence)."""
    ip = (
        effects[(effects.condition == "ip")].dropna(subset=["effect"])
        if "effect" in effects
        else pd.DataFrame()
    )
    rows, infl = [], []
    if ip.empty:
        return pd.DataFrame(), pd.DataFrame()
    for est in ESTIMATORS:
        col = f"elicit_{est}"
        if ip[col].isna().all():
            continue
        for (epoch, subset), e in [
            ((ep, sub), g[g.role == "inoculation"] if sub == "inoculation prompts" else g)
            for ep, g in ip.groupby("epoch")
            for sub in ("IP-style prompts", "inoculation prompts")
        ]:
            per_setting = []
            for (setting, design, var), s in e.dropna(subset=[col]).groupby(["setting", "design", "variant"]):
                el = (
                    elicitation[(elicitation.setting == setting) & (elicitation.get("variant", "") == var)]
                    .drop_duplicates("prompt")
                    .set_index("prompt")
                    if not elicitation.empty
                    else None
                )
                sx = [
                    (
                        _se_from_ci(el.at[p, f"{est}_lo"], el.at[p, f"{est}_hi"])
                        if el is not None and p in el.index
                        else np.nan
                    )
                    for p in s.prompt
                ]
                c = st.correlation(s[col], s.effect, n_permutations=n_permutations)
                row = {
                    "setting": setting,
                    "design": design,
                    "variant": var,
                    "epoch": epoch,
                    "estimator": est,
                    "prompts": subset,
                    **c,
                    **st.slopes(s[col], s.effect, sx, s.effect_se),
                    f"power_at_r{reference_r}": st.correlation_power(reference_r, c["points"]),
                    "smallest_r_80pct": st.smallest_correlation(c["points"]),
                }
                rows.append(row)
                if not var:  # pooled across settings: each setting's prompts as the library places them, once
                    per_setting.append(row)
                if subset == "IP-style prompts":
                    i = st.influence(s[col], s.effect, list(s.prompt))
                    if not i.empty:
                        infl.append(i.assign(setting=setting, design=design, epoch=epoch, estimator=est))
            if len(per_setting) > 1:
                m = st.meta_correlation(
                    [r["pearson"] for r in per_setting], [r["points"] for r in per_setting]
                )
                rows.append(
                    {
                        "setting": "pooled (random-effects, Fisher z)",
                        "epoch": epoch,
                        "estimator": est,
                        "prompts": subset,
                        "points": sum(r["points"] for r in per_setting),
                        "pooled_settings": ", ".join(
                            sorted(r["setting"] for r in per_setting if np.isfinite(r["pearson"]))
                        ),
                        **m,
                    }
                )
    return pd.DataFrame(rows), (pd.concat(infl, ignore_index=True) if infl else pd.DataFrame())


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on clusters or CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_behaviour(table: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    settings = list(dict.fromkeys(table.setting))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        t = table[table.setting == setting]
        base = t[t.arm == "base"]
        for a in [a for a in dict.fromkeys(t.arm) if a != "base"]:
            rows = pd.concat([base.assign(arm=a), t[t.arm == a]]).sort_values("epoch")
            # None (n=0) -> nan
            rows = rows[["epoch", "behaviour", "behaviour_lo", "behaviour_hi"]].astype(float)
            # clip: a Wilson bound can sit 1e-17 on the wrong side of the rate
            yerr = [
                (rows.behaviour - rows.behaviour_lo).clip(lower=0),
                (rows.behaviour_hi - rows.behaviour).clip(lower=0),
            ]
            ax.errorbar(rows.epoch, rows.behaviour, yerr=yerr, marker="o", capsize=3, label=a)
        ax.set_title(f"{setting}: {t.behaviour_metric.dropna().iloc[0]} (unmodified test prompt)")
        ax.set_xlabel("epoch (0 = untrained)")
        ax.set_ylabel("behaviour rate (share of replies), 95% CI over seeds x items")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(sorted(t.epoch.unique()))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def elicitation_table(records: list[dict]) -> pd.DataFrame:
    """One row per (setting, prompt): both estimators with their CIs, as recorded by the runs."""
    rows = {}
    for r in records:
        for est, v in recorded_elicitation(r).items():
            row = rows.setdefault(
                (r["setting"], r["prompt"], variant(r)),
                {
                    "setting": r["setting"],
                    "prompt": r["prompt"],
                    "variant": variant(r),
                    "role": r["role"],
                    "arm": arm(r),
                },
            )
            row.update({est: v["estimate"], f"{est}_lo": v["lo"], f"{est}_hi": v["hi"]})
    return pd.DataFrame(list(rows.values()))


def plot_scatter(effects: pd.DataFrame, elicitation: pd.DataFrame, estimator: str, path: Path) -> Path | None:
    """Elicitation (x, 95% CI) vs inoculation effect (y, 95% CI over seeds x items), last epoch, with an OLS
    fit.
    Needs at least 3 prompts with an estimate in some setting."""
    ip = (
        effects[effects.condition == "ip"].dropna(subset=["effect"])
        if "effect" in effects
        else pd.DataFrame()
    )
    if ip.empty or elicitation.empty or estimator not in elicitation:
        return None
    settings = [
        s
        for s in sorted(ip.setting.unique())
        if ip[(ip.setting == s) & ip[f"elicit_{estimator}"].notna()].prompt.nunique() >= 3
    ]
    if not settings:
        return None
    plt = pyplot()
    unit = "share of replies" if estimator == "sampled" else "nats/token"
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        e = ip[(ip.setting == setting) & (ip.epoch == ip[ip.setting == setting].epoch.max())]
        pts, labels = [], []
        for g in e.itertuples():
            el = elicitation[(elicitation.setting == setting) & (elicitation.prompt == g.prompt)]
            if el.empty or pd.isna(el[estimator].iloc[0]):
                continue
            x, xlo, xhi = el[estimator].iloc[0], el[f"{estimator}_lo"].iloc[0], el[f"{estimator}_hi"].iloc[0]
            ax.errorbar(
                x,
                g.effect,
                xerr=[[max(x - xlo, 0)], [max(xhi - x, 0)]],
                yerr=[[max(g.effect - g.effect_lo, 0)], [max(g.effect_hi - g.effect, 0)]],
                fmt="o",
                capsize=3,
            )
            pts.append((x, g.effect))
            labels.append(g.prompt)
        _label_points(ax, pts, labels)
        if len(pts) >= 3 and np.ptp([p[0] for p in pts]) > 0:  # no line through points that share one x
            fit = stats.linregress(*zip(*pts))
            xs = np.linspace(min(p[0] for p in pts), max(p[0] for p in pts), 20)
            ax.plot(
                xs, fit.intercept + fit.slope * xs, "--", color="grey", label=f"OLS fit, r={fit.rvalue:+.2f}"
            )
            ax.legend(fontsize=8)
        ax.axhline(0, color="lightgrey", lw=0.8)
        ax.set_title(f"{setting}, epoch {int(e.epoch.max()) if len(e) else '?'}: elicitation vs effect")
        ax.set_xlabel(f"elicitation ({estimator}, {unit}) on the base model, 95% CI")
        ax.set_ylabel("inoculation effect b(control) - b(IP), 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label_points(ax, pts: list[tuple[float, float]], labels: list[str]) -> None:
    """Label each point, moving a label down a line at a time while it would sit on an earlier one
    (labels are compared in display space, so the rule holds at any axis scale)."""
    ax.figure.canvas.draw()  # fixes the data-to-pixel transform
    placed: list[tuple[float, float]] = []
    for (x, y), label in sorted(zip(pts, labels), key=lambda t: (-t[0][1], t[0][0])):
        px, py = ax.transData.transform((x, y))
        dy = 4
        while any(abs(px - qx) < 60 and abs(py + dy - qy) < 9 for qx, qy in placed):
            dy -= 9
        placed.append((px, py + dy))
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, dy), textcoords="offset points")


def plot_effect_curves(effects: pd.DataFrame, path: Path) -> Path | None:
    """Effect vs epochs per arm with 95% CIs, and capability cost vs effect."""
    if "effect" not in effects or effects.effect.isna().all():
        return None
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    e = effects.dropna(subset=["effect"])
    for (setting, _, a), g in e.groupby(["setting", "design", "arm"]):
        g = g.sort_values("epoch")
        label = f"{setting}: {a}" if e.setting.nunique() > 1 else a
        a1.errorbar(
            g.epoch,
            g.effect,
            yerr=[(g.effect - g.effect_lo).clip(lower=0), (g.effect_hi - g.effect).clip(lower=0)],
            marker="o",
            capsize=3,
            label=label,
        )
        a2.scatter(g.effect, g.capability_cost, label=label)
    a1.axhline(0, color="lightgrey", lw=0.8)
    a1.set_title("Inoculation effect by epoch")
    a1.set_xlabel("epoch")
    a1.set_ylabel("effect b(control) - b(arm), share of replies, 95% CI")
    a1.set_xticks(sorted(e.epoch.unique()))
    a1.legend(fontsize=7)
    a2.axhline(0, color="lightgrey", lw=0.8)
    a2.axvline(0, color="lightgrey", lw=0.8)
    a2.set_title("Capability cost vs effect (each arm and epoch)")
    a2.set_xlabel("inoculation effect (share of replies)")
    a2.set_ylabel("capability cost c(control) - c(arm), share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def _fmt(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3f") if not df.empty else "(none)"


def power_table(conditions: pd.DataFrame, effects: pd.DataFrame, reference_r: float = 0.57) -> pd.DataFrame:
    """What this sweep could detect at 80% power: the smallest effect given its items and the control's rate,
    and the smallest correlation given its prompts; and its power for the paper's r (0.57)."""
    rows = []
    if conditions.empty or "behaviour" not in conditions:
        return pd.DataFrame()
    ctrl = conditions[conditions.arm == "control"]
    for (setting, design, epoch), c in ctrl.groupby(["setting", "design", "epoch"]):
        e = (
            effects[(effects.setting == setting) & (effects.design == design) & (effects.epoch == epoch)]
            if not effects.empty
            else effects
        )
        prompts_n = int((e.condition == "ip").sum()) if not e.empty else 0
        items = int(c.behaviour_items.iloc[0])
        rate = float(c.behaviour.iloc[0])
        rows.append(
            {
                "setting": setting,
                "design": design,
                "epoch": epoch,
                "items": items,
                "control_rate": rate,
                "smallest_effect_80pct": st.smallest_effect(rate, items) if 0 < rate else np.nan,
                "ip_prompts": prompts_n,
                "smallest_r_80pct": st.smallest_correlation(prompts_n),
                f"power_at_r{reference_r}": st.correlation_power(reference_r, prompts_n),
                f"prompts_for_r{reference_r}": st.points_needed(reference_r),
            }
        )
    return pd.DataFrame(rows)


def provenance(records: list[dict], dirs: list[Path]) -> list[str]:
    """Who made these numbers: the analysis (date, ipsweep version and commit, machine) and the runs (models,
    code versions, machines, the sweep commands from each sweep's multirun.yaml)."""
    import platform
    import time

    from omegaconf import OmegaConf

    def values(get) -> str:
        return ", ".join(sorted({str(v) for r in records if (v := get(r))})) or "unknown"

    code = store.code_version()
    lines = [
        f"- analysed {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} with ipsweep {code['ipsweep']}"
        + (f" (commit {code['commit']})" if "commit" in code else ""),
        f"- runs: model {values(lambda r: r['model'])}; made by ipsweep commit "
        f"{values(lambda r: (r.get('versions') or {}).get('commit'))}, torch "
        f"{values(lambda r: (r.get('versions') or {}).get('torch'))}; "
        f"on {values(lambda r: ((r.get('attempts') or [{}])[-1]).get('host'))}",
    ]
    for d in dirs:
        path = d / "multirun.yaml"
        if path.is_file():
            overrides = OmegaConf.select(OmegaConf.load(path), "hydra.overrides.task") or []
            lines.append(f"- sweep command: `python launch.py -m {' '.join(map(str, overrides))}`")
    return lines


def screened_elicitation(paths: list, records: list[dict]) -> pd.DataFrame:
    """Elicitation estimates from `ipsweep screen` tables (elicitation.csv) instead of the runs' records: a
    new
    estimator is tested against finished sweeps without retraining. Each table must be of the runs' model."""
    tables = []
    for path in paths:
        t = pd.read_csv(path)
        missing = {"setting", "model", "prompt", "role"} - set(t)
        if missing:
            raise ConfigError(
                f"{path} lacks column(s) {', '.join(sorted(missing))}; fix: pass an elicitation.csv "
                "written by `ipsweep screen`"
            )
        tables.append(t)
    screened = pd.concat(tables, ignore_index=True)
    runs = {(r["setting"], r["model"]) for r in records}
    for setting, model in sorted(runs):
        have = set(screened.model[screened.setting == setting])
        if have and model not in have:
            raise ConfigError(
                f"the screen of setting '{setting}' was made on model(s) {', '.join(sorted(have))}, the "
                "runs on "
                f"'{model}'; fix: screen with the runs' model (ipsweep screen setting={setting} model=...)"
            )
    return screened[screened.role != "safety"].assign(arm=lambda t: t.prompt)


def _use_screened(arms: pd.DataFrame, screened: pd.DataFrame) -> pd.DataFrame:
    """The arms' elicitation columns read from the screen (IP-style arms only; NaN where a prompt was not
    screened)."""
    out = arms.copy()
    key = screened.set_index(["setting", "prompt"])
    for est in ESTIMATORS:
        values = key[est].to_dict() if est in key else {}
        out[f"elicit_{est}"] = [
            values.get((s, p), np.nan) if c == "ip" else None
            for s, p, c in zip(out.setting, out.prompt, out.condition)
        ]
    return out


def analyze(
    sweep_dirs: str | Path | list,
    out_dir: str | Path | None = None,
    n_permutations: int = 9999,
    skip_damaged: bool = False,
    elicitation_from: list | None = None,
) -> dict:
    """Write the tables (CSV), plots and report.md of one or several sweeps; return paths and tables.

    Several sweep dirs (e.g. one per setting) are analysed together: the pooled correlation then spans them.
    elicitation_from: `ipsweep screen` tables whose estimates replace those the runs recorded."""
    dirs = [Path(d) for d in (sweep_dirs if isinstance(sweep_dirs, (list, tuple)) else [sweep_dirs])]
    for d in dirs:
        if not store.is_sweep_dir(d):
            raise ConfigError(
                f"'{d}' is not a sweep dir (no runs/ folder); fix: pass the folder a sweep wrote, e.g. "
                "outputs/demo"
            )
    if len(dirs) > 1 and out_dir is None:
        raise ConfigError("several sweep dirs need one output folder; fix: add --out <folder>")
    scans = [store.scan(d) for d in dirs]
    records = [r for good, _ in scans for r in good]
    damaged = [e for _, bad in scans for e in bad]
    if damaged and not skip_damaged:
        raise ConfigError(
            f"{len(damaged)} damaged run record(s), not analysed:\n"
            + "\n".join(f"  {e}" for e in damaged)
            + "\nfix: rerun the sweep (it sets each damaged record aside and reruns that point), or "
            "analyse without them: ipsweep analyze ... --skip-damaged"
        )
    if not records:
        raise ConfigError(
            f"{', '.join(map(str, dirs))} hold no run records yet; fix: run the sweep first, or wait for "
            "its first epoch"
        )
    check_controls(records)
    sources = ", ".join(map(str, dirs))
    out = Path(out_dir or dirs[0] / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    df, its, arms = tidy(records), items(records), arm_evaluations(records)
    screened = screened_elicitation(elicitation_from, records) if elicitation_from else None
    if screened is not None:
        arms = _use_screened(arms, screened)
    if its.empty:
        raise ConfigError(
            f"the records in {sources} have no per-item outcomes (made before run signature v3); "
            "fix: rerun the sweep with this version (it retrains under the new signature)"
        )
    table = condition_table(arms, its)
    groups = condition_table(arms, its, by=("eval_set", "group"))
    effects, per_seed = effect_table(arms, its)
    elicitation = elicitation_table(records) if screened is None else screened
    correlations, influence = correlation_table(effects, elicitation, n_permutations)
    power = power_table(table, effects)
    by_test_prompt = test_prompt_table(df)
    leaks, frontier = leak_table(records, its), frontier_table(table)
    tables = {
        "tidy": df,
        "items": its,
        "conditions": table,
        "groups": groups,
        "effects": effects,
        "effects_per_seed": per_seed,
        "elicitation": elicitation,
        "correlations": correlations,
        "influence": influence,
        "power": power,
        "leaks": leaks,
        "frontier": frontier,
    }
    for name, t in tables.items():
        t.to_csv(out / f"{name}.csv", index=False)
    its.to_parquet(out / "items.parquet", index=False)
    (out / "conditions.md").write_text(_fmt(table) + "\n")
    plot = plot_behaviour(table, out / "behaviour.png")
    plots = {
        "behaviour": plot,
        "effect_curves": plot_effect_curves(effects, out / "effect_curves.png"),
        "frontier": plot_frontier(frontier, out / "frontier.png"),
    }
    for est in ESTIMATORS:
        plots[f"scatter_{est}"] = plot_scatter(effects, elicitation, est, out / f"scatter_{est}.png")
    plots = {k: v for k, v in plots.items() if v}
    failed = [r for r in records if r["status"] != "done"]
    status_lines = [
        f"- {Path(r['run_dir']).name}: {r['status']}"
        + (f" ({r['error']['type']}: {r['error']['message']})" if r.get("error") else "")
        for r in failed
    ]

    def show(t: pd.DataFrame, cols: list[str]) -> str:
        return _fmt(t[[c for c in cols if c in t]]) if not t.empty else "(none)"

    degenerate = [
        f"{r.arm} epoch {r.epoch}"
        for r in effects.itertuples()
        if "degenerate" in str(getattr(r, "effect_method", ""))
    ]
    report = "\n".join(
        [
            f"# ipsweep report: {sources}",
            "",
            *provenance(records, dirs),
            *(
                [
                    "- elicitation estimates: from `ipsweep screen` table(s) "
                    f"{', '.join(map(str, elicitation_from))}, not from the runs"
                ]
                if screened is not None
                else []
            ),
            "",
            f"{len(records)} runs ({len(records) - len(failed)} done, {len(failed)} not done).",
            "",
            "## Behaviour and capability per condition and epoch",
            "Mean over seeds x eval items under the arm's headline test prompt (unmodified; PTST: its "
            "safety prompt).",
            "95% CIs count seed-to-seed and item-to-item variation (crossed seeds x items; with 1 seed, "
            "items only;",
            "`*_method` says which). Epoch 0 (`base`) is the untrained model.",
            "",
            show(
                table,
                [
                    "setting",
                    "arm",
                    "epoch",
                    "seeds",
                    "behaviour_metric",
                    "behaviour",
                    "behaviour_ci",
                    "behaviour_k/n",
                    "capability_metric",
                    "capability",
                    "capability_ci",
                    "capability_k/n",
                ],
            ),
            "",
            "## Inoculation effect vs the matched control",
            "effect = b(control) - b(arm), capability_cost = c(control) - c(arm). The control is the run "
            "whose config equals",
            "the arm's except the training prompt (same seed, model, data, hyper-parameters); paired by "
            "seed and item.",
            "PTST arms are the control's own models tested with the safety prompt. CI: crossed seeds x "
            "items; `p`: its",
            "test of no effect, Holm-adjusted across the arms of a setting and epoch (`p_holm`); "
            "`seed_ci`: t-interval",
            "over per-seed effects (ignores item sampling; nan with one seed).",
            "",
            show(
                effects,
                [
                    "setting",
                    "arm",
                    "epoch",
                    "seeds",
                    "items",
                    "elicit_sampled",
                    "elicit_logprob",
                    "elicit_logprob_train",
                    "effect",
                    "effect_ci",
                    "effect_p",
                    "effect_p_holm",
                    "effect_seed_ci",
                    "capability_cost",
                    "capability_cost_ci",
                ],
            ),
            "",
            "Degenerate intervals (every seed and item gives the same difference): "
            + (", ".join(degenerate) or "none")
            + ".",
            "",
            f"![behaviour rate by condition and epoch]({plot.name})",
            "",
            "## Capability vs behaviour: the frontier",
            "Each arm per epoch as a point (capability, behaviour) with the 95% CIs of the condition "
            "table, beside the",
            "control and the untrained model (`base`, the reference). `on_frontier`: no other trained arm "
            "of the epoch has",
            "both less behaviour and more capability. A single effect number hides this trade-off; read "
            "the two together.",
            "",
            show(
                frontier[frontier.on_frontier] if not frontier.empty else frontier,
                ["setting", "panel", "arm", "behaviour", "behaviour_ci", "capability", "capability_ci"],
            ),
            "",
            *([f"![capability vs behaviour]({plots['frontier'].name})", ""] if plots.get("frontier") else []),
            "## Leak tests: does the behaviour come back under a related prompt?",
            "Behaviour of each arm with a prompt resembling the IP inserted at test time: its negation "
            "(`negation`), its",
            "keywords (`keywords`), a paraphrase held out from training (`heldout`); "
            "`eval.leak_tests=true` runs them. The",
            "control under the same prompt is the baseline; `base` the untrained model. Same intervals as "
            "above.",
            "",
            show(
                leaks,
                ["setting", "test_prompt", "arm", "epoch", "seeds", "behaviour", "behaviour_ci", "items"],
            ),
            "",
            "## Per eval set and group (question type, OOD label), final epoch of each arm",
            "Same intervals as above, within each group; all epochs in groups.csv.",
            "",
            show(
                groups[groups.epoch == groups.groupby(["setting", "arm"]).epoch.transform("max")]
                if not groups.empty
                else groups,
                [
                    "setting",
                    "arm",
                    "epoch",
                    "eval_set",
                    "group",
                    "behaviour",
                    "behaviour_ci",
                    "capability",
                    "capability_ci",
                ],
            ),
            "",
            "## Behaviour under each test-time prompt",
            "Pooled behaviour rate of each trained arm with each prompt inserted at test time (`none` = "
            "unmodified).",
            "",
            _fmt(by_test_prompt),
            "",
            "## Elicitation strength of each prompt on the untrained model",
            "sampled = b(prompt inserted) - b(unmodified) on the same items, 95% CI paired by item; "
            "logprob = mean per-token",
            "log-prob gain (nats) of the training replies with the prompt inserted, t 95% CI.",
            "",
            _fmt(elicitation),
            "",
            "## Does elicitation predict the inoculation effect?",
            "One point per IP-style prompt, per setting and epoch, for all IP-style prompts and for the "
            "inoculation-role ones",
            "alone. Pearson with a Fisher-z 95% CI, Spearman with a Bonett-Wright CI, each with a "
            "permutation p-value. The",
            "interval is for the correlation between the elicitation estimates and the measured effects: "
            "noise in either",
            "pulls it towards 0. slope_eiv: errors-in-variables (Deming) slope using both axes' standard "
            "errors,",
            "beside the OLS slope. Pooled rows: random-effects (DerSimonian-Laird) meta-analysis of Fisher "
            "z across settings.",
            "PTST arms are not points (their training data is unmodified).",
            "",
            show(
                correlations,
                [
                    "setting",
                    "variant",
                    "epoch",
                    "estimator",
                    "prompts",
                    "points",
                    "pearson",
                    "pearson_lo",
                    "pearson_hi",
                    "pearson_p",
                    "spearman",
                    "spearman_lo",
                    "spearman_hi",
                    "spearman_p",
                    "slope_ols",
                    "slope_eiv",
                    "tau2",
                    "pooled_settings",
                ],
            ),
            "",
            "### Leave one prompt out",
            "Pearson r without each prompt, its leverage and Cook's distance (OLS effect ~ elicitation); a "
            "prompt with",
            "Cook's D above 1, or whose removal changes the sign of r, carries the correlation.",
            "",
            show(influence, ["setting", "epoch", "estimator", "prompt", "r_without", "leverage", "cooks_d"]),
            "",
            *[f"![{k}]({v.name})" for k, v in plots.items() if k != "behaviour"],
            "",
            "## Power of this design",
            "At 80% power and alpha 0.05: the smallest drop from the control's behaviour rate detectable "
            "with this many eval",
            "items (two proportions, one seed; more seed-to-seed variation needs more), the smallest "
            "correlation detectable",
            "with this many IP prompts, and the power for the paper's r = 0.57 (Fisher z). `ipsweep power` "
            "plans a sweep.",
            "",
            _fmt(power),
            "",
            "## Runs not done",
            "",
            "\n".join(status_lines) or "(none)",
            "",
            "## Damaged run records (left out)",
            "",
            "\n".join(f"- {e}" for e in damaged) or "(none)",
            "",
        ]
    )
    (out / "report.md").write_text(report)
    return {
        "out_dir": out,
        "table": table,
        "effects": effects,
        "elicitation": elicitation,
        "correlations": correlations,
        "influence": influence,
        "power": power,
        "by_test_prompt": by_test_prompt,
        "groups": groups,
        "tidy": df,
        "items": its,
        "effects_per_seed": per_seed,
        "leaks": leaks,
        "frontier": frontier,
        "report": out / "report.md",
        "plot": plot,
        "plots": plots,
        "records": records,
    }
