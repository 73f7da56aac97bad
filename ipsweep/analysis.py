"""Read a sweep's run records and build the tables, plot and report. Reads records only, never logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ipsweep import store
from ipsweep.errors import ConfigError
from ipsweep.evaluate import rate

ARM_ORDER = {"control": 0, "ip": 1, "ptst": 2}


def arm(record: dict) -> str:
    """Display name of a run's condition: control, ip:<prompt>, ptst:<prompt>."""
    return "control" if record["condition"] == "control" else f"{record['condition']}:{record['prompt']}"


def tidy(records: list[dict]) -> pd.DataFrame:
    """One row per run x epoch x test prompt x metric, with counts and Wilson CIs."""
    rows = []
    for r in records:
        for epoch, entry in r["epochs"].items():
            for test_prompt, ev in entry["evals"].items():
                for metric, m in ev["metrics"].items():
                    rows.append({
                        "sweep": r.get("sweep"), "setting": r["setting"], "model": r["model"], "arm": arm(r),
                        "condition": r["condition"], "prompt": r["prompt"], "role": r["role"], "seed": r["seed"],
                        "signature": r["signature"], "status": r["status"], "epoch": int(epoch),
                        "test_prompt": test_prompt, "headline": test_prompt == r["headline_test_prompt"],
                        "metric": metric,
                        "kind": "behaviour" if metric == r["behaviour_metric"]
                        else "capability" if metric == r["capability_metric"] else "other",
                        "loss": entry.get("loss"),
                        "elicit_sampled": r.get("elicitation", {}).get("sampled", {}).get("estimate"),
                        "elicit_logprob": r.get("elicitation", {}).get("logprob", {}).get("estimate"), **m,
                    })
    return pd.DataFrame(rows)


def group_table(records: list[dict]) -> pd.DataFrame:
    """Behaviour and capability per eval set and group (question type, OOD label), pooled over seeds,
    under each run's headline test prompt; epoch 0 once, as arm `base`."""
    counts: dict[tuple, list[int]] = {}
    for r in records:
        for epoch, entry in r["epochs"].items():
            ev = entry["evals"].get(r["headline_test_prompt"] if epoch != "0" else "none")
            if ev is None:
                continue
            a = "base" if epoch == "0" else arm(r)
            for g in ev["by_group"]:
                kind = "behaviour" if g["metric"] == r["behaviour_metric"] else \
                    "capability" if g["metric"] == r["capability_metric"] else None
                if kind is None:
                    continue
                key = (r["setting"], a, int(epoch), g["eval_set"], g["group"], kind)
                if a == "base" and key in counts:
                    continue  # the same untrained evaluation, recorded by every run
                c = counts.setdefault(key, [0, 0])
                c[0] += g["k"]
                c[1] += g["n"]
    rows = [{"setting": s_, "arm": a, "epoch": e, "eval_set": es, "group": g, "kind": kind, **rate(k, n)}
            for (s_, a, e, es, g, kind), (k, n) in counts.items()]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    wide = df.pivot_table(index=["setting", "arm", "epoch", "eval_set", "group"], columns="kind", values="rate").reset_index()
    return wide.sort_values(["setting", "arm", "epoch", "eval_set", "group"]).reset_index(drop=True)


def condition_table(df: pd.DataFrame) -> pd.DataFrame:
    """Behaviour and capability per setting, arm and epoch, pooled over seeds (headline test prompt).

    Epoch 0 is the untrained model, the same for every arm, so it appears once as arm `base`.
    """
    head = df[df.headline & df.kind.isin(["behaviour", "capability"])].copy()
    base = head[head.epoch == 0].drop_duplicates(["setting", "model", "test_prompt", "metric"]).assign(arm="base", seed=-1)
    base = base[base.test_prompt == "none"]
    head = pd.concat([base, head[head.epoch > 0]])
    out = []
    for (setting, a, epoch), g in head.groupby(["setting", "arm", "epoch"], sort=False):
        row = {"setting": setting, "arm": a, "epoch": epoch, "seeds": g.seed.nunique() if a != "base" else 0}
        for kind in ("behaviour", "capability"):
            part = g[g.kind == kind]
            r = rate(int(part.k.sum()), int(part.n.sum()))
            row[f"{kind}_metric"] = part.metric.iloc[0] if len(part) else None
            row[kind], row[f"{kind}_lo"], row[f"{kind}_hi"] = r["rate"], r["lo"], r["hi"]
            row[f"{kind}_ci"] = f"[{r['lo']:.2f}, {r['hi']:.2f}]" if r["n"] else ""
            row[f"{kind}_k/n"] = f"{r['k']}/{r['n']}"
        out.append(row)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    order = table.arm.map(lambda a: -1 if a == "base" else ARM_ORDER[a.split(":")[0]])
    return table.assign(_o=order).sort_values(["setting", "_o", "arm", "epoch"]).drop(columns="_o").reset_index(drop=True)


def bootstrap_mean_ci(values, seed: int = 0) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return (float("nan"), float("nan")) if len(values) < 2 else (float(values[0]), float(values[0]))
    res = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=9999,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def effects_long(df: pd.DataFrame) -> pd.DataFrame:
    """Per run and epoch: inoculation effect b(control) - b(arm) and capability cost c(control) - c(arm),
    matched on setting, seed and epoch, both under the unmodified test prompt."""
    plain = df[(df.test_prompt == "none") & df.kind.isin(["behaviour", "capability"]) & (df.epoch > 0)]
    if plain.empty:
        return pd.DataFrame()
    index = ["setting", "seed", "epoch", "arm", "prompt", "role", "condition", "elicit_sampled", "elicit_logprob"]
    wide = plain.pivot_table(index=index, columns="kind", values="rate", dropna=False).reset_index().dropna(subset=["behaviour"])
    control = wide[wide.arm == "control"][["setting", "seed", "epoch", "behaviour", "capability"]]
    merged = wide[wide.arm != "control"].merge(control, on=["setting", "seed", "epoch"], suffixes=("", "_control"))
    merged["effect"] = merged.behaviour_control - merged.behaviour
    merged["capability_cost"] = merged.capability_control - merged.capability
    return merged


def effect_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean effect and capability cost over seeds per arm and epoch, with bootstrap 95% CIs."""
    merged = effects_long(df)
    if merged.empty:
        return pd.DataFrame()
    out = []
    for (setting, a, epoch), g in merged.groupby(["setting", "arm", "epoch"]):
        lo, hi = bootstrap_mean_ci(g.effect)
        clo, chi = bootstrap_mean_ci(g.capability_cost)
        out.append({"setting": setting, "arm": a, "epoch": epoch, "seeds": len(g),
                    "elicit_sampled": g.elicit_sampled.iloc[0], "elicit_logprob": g.elicit_logprob.iloc[0],
                    "effect": g.effect.mean(), "effect_ci": f"[{lo:.2f}, {hi:.2f}]",
                    "capability_cost": g.capability_cost.mean(), "capability_cost_ci": f"[{clo:.2f}, {chi:.2f}]"})
    return pd.DataFrame(out)


def _rank(a: np.ndarray) -> np.ndarray:
    return stats.rankdata(a, axis=-1)


def hierarchical_bootstrap(groups: list[list[tuple[float, np.ndarray]]], n_resamples: int = 2000,
                           seed: int = 0) -> dict:
    """Pearson and Spearman of x (elicitation) vs mean y (effect over seeds), one point per prompt.

    `groups`: per stratum (setting), a list of (x, effects over seeds) per prompt. Each resample draws
    prompts with replacement within each stratum, then seeds with replacement within each prompt.
    Returns point estimates (scipy.stats) and percentile 95% CIs.
    """
    rng = np.random.default_rng(seed)
    x = np.concatenate([[p[0] for p in g] for g in groups])
    y = np.concatenate([[p[1].mean() for p in g] for g in groups])
    out = {"points": len(x)}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {**out, "pearson": np.nan, "pearson_lo": np.nan, "pearson_hi": np.nan,
                "spearman": np.nan, "spearman_lo": np.nan, "spearman_hi": np.nan}
    out["pearson"] = float(stats.pearsonr(x, y).statistic)
    out["spearman"] = float(stats.spearmanr(x, y).statistic)
    bx, by = [], []
    for g in groups:
        pick = rng.integers(0, len(g), size=(n_resamples, len(g)))
        xs = np.array([p[0] for p in g])[pick]
        ys = np.empty(pick.shape)
        for j, p in enumerate(g):  # resample prompt j's seeds, for every resample at once
            seeds = p[1][rng.integers(0, len(p[1]), size=(n_resamples, len(p[1])))].mean(axis=1)
            ys[pick == j] = seeds[np.nonzero(pick == j)[0]]
        bx.append(xs)
        by.append(ys)
    bx, by = np.concatenate(bx, axis=1), np.concatenate(by, axis=1)
    ok = (np.ptp(bx, axis=1) > 0) & (np.ptp(by, axis=1) > 0)  # a resample of one repeated prompt has no r
    for name, (a, b) in {"pearson": (bx[ok], by[ok]), "spearman": (_rank(bx[ok]), _rank(by[ok]))}.items():
        r = stats.pearsonr(a, b, axis=1).statistic
        out[f"{name}_lo"], out[f"{name}_hi"] = (float(v) for v in np.percentile(r, [2.5, 97.5]))
    return out


def _standardise(points: list[tuple[float, np.ndarray]]) -> list[tuple[float, np.ndarray]]:
    """z-score x and y within one setting, so pooling compares prompts within settings, not settings."""
    x = np.array([p[0] for p in points])
    y_all = np.concatenate([p[1] for p in points])
    sx, sy = x.std(), y_all.std() or 1.0  # x varies (correlation_table pools only such settings)
    return [((p[0] - x.mean()) / sx, (p[1] - y_all.mean()) / sy) for p in points]


def correlation_table(effects: pd.DataFrame, n_resamples: int = 2000) -> pd.DataFrame:
    """Elicitation vs inoculation effect, per setting and pooled, per epoch and estimator.

    One point per IP-style prompt (inoculation, neutral, placebo); PTST arms are excluded because their
    training data is unmodified. The control is not a point: its effect is 0 by definition.
    """
    ip = effects[effects.condition == "ip"] if not effects.empty else effects
    rows = []
    for est in ("sampled", "logprob"):
        col = f"elicit_{est}"
        if ip.empty or ip[col].isna().all():
            continue
        for epoch, e in ip.groupby("epoch"):
            per_setting = {
                setting: [(g[col].iloc[0], g.effect.to_numpy()) for _, g in s.groupby("prompt") if pd.notna(g[col].iloc[0])]
                for setting, s in e.groupby("setting")
            }
            for setting, points in per_setting.items():
                rows.append({"setting": setting, "epoch": epoch, "estimator": est,
                             **hierarchical_bootstrap([points], n_resamples)})
            # A setting whose estimate is the same for every prompt cannot rank them: left out of the pool
            # (at z = 0 its points would only pull the pooled r towards 0).
            ranked = {s: p for s, p in per_setting.items() if len(p) > 1 and np.ptp([x for x, _ in p]) > 0}
            if len(per_setting) > 1 and ranked:
                rows.append({"setting": "pooled (z within setting)", "epoch": epoch, "estimator": est,
                             "pooled_settings": ", ".join(sorted(ranked)),
                             **hierarchical_bootstrap([_standardise(p) for p in ranked.values()], n_resamples)})
    return pd.DataFrame(rows)


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
            rows = rows[["epoch", "behaviour", "behaviour_lo", "behaviour_hi"]].astype(float)  # None (n=0) -> nan
            # clip: a Wilson bound can sit 1e-17 on the wrong side of the rate
            yerr = [(rows.behaviour - rows.behaviour_lo).clip(lower=0), (rows.behaviour_hi - rows.behaviour).clip(lower=0)]
            ax.errorbar(rows.epoch, rows.behaviour, yerr=yerr, marker="o", capsize=3, label=a)
        ax.set_title(f"{setting}: {t.behaviour_metric.dropna().iloc[0]} (unmodified test prompt)")
        ax.set_xlabel("epoch (0 = untrained)")
        ax.set_ylabel("behaviour rate, 95% Wilson CI (pooled over seeds)")
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
        for est, v in r.get("elicitation", {}).items():
            row = rows.setdefault((r["setting"], r["prompt"]), {"setting": r["setting"], "prompt": r["prompt"],
                                                                "role": r["role"], "arm": arm(r)})
            row.update({est: v["estimate"], f"{est}_lo": v["lo"], f"{est}_hi": v["hi"]})
    return pd.DataFrame(list(rows.values()))


def plot_scatter(effects: pd.DataFrame, elicitation: pd.DataFrame, estimator: str, path: Path) -> Path | None:
    """Elicitation (x, 95% CI) vs mean inoculation effect over seeds (y, bootstrap 95% CI), last epoch, with a fit."""
    ip = effects[effects.condition == "ip"] if not effects.empty else effects
    if ip.empty or elicitation.empty or estimator not in elicitation:
        return None
    plt = pyplot()
    settings = sorted(ip.setting.unique())
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        e = ip[(ip.setting == setting) & (ip.epoch == ip[ip.setting == setting].epoch.max())]
        pts = []
        for prompt, g in e.groupby("prompt"):
            el = elicitation[(elicitation.setting == setting) & (elicitation.prompt == prompt)]
            if el.empty or pd.isna(el[estimator].iloc[0]):
                continue
            x, xlo, xhi = el[estimator].iloc[0], el[f"{estimator}_lo"].iloc[0], el[f"{estimator}_hi"].iloc[0]
            y = g.effect.mean()
            lo, hi = bootstrap_mean_ci(g.effect)
            yerr = [[y - lo], [hi - y]] if np.isfinite(lo) else None
            ax.errorbar(x, y, xerr=[[x - xlo], [xhi - x]], yerr=yerr, fmt="o", capsize=3)
            ax.annotate(prompt, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            pts.append((x, y))
        if len(pts) >= 3 and np.ptp([p[0] for p in pts]) > 0:  # no line through points that share one x
            fit = stats.linregress(*zip(*pts))
            xs = np.linspace(min(p[0] for p in pts), max(p[0] for p in pts), 20)
            ax.plot(xs, fit.intercept + fit.slope * xs, "--", color="grey", label=f"fit, r={fit.rvalue:+.2f}")
            ax.legend(fontsize=8)
        ax.axhline(0, color="lightgrey", lw=0.8)
        ax.set_title(f"{setting}, epoch {int(e.epoch.max()) if len(e) else '?'}")
        ax.set_xlabel(f"elicitation ({estimator}) on the base model")
        ax.set_ylabel("inoculation effect b(control) - b(IP)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_effect_curves(effects: pd.DataFrame, path: Path) -> Path | None:
    """Effect vs epochs per prompt (mean over seeds), and capability cost vs effect."""
    if effects.empty:
        return None
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    means = effects.groupby(["setting", "arm", "epoch"])[["effect", "capability_cost"]].mean().reset_index()
    for (setting, a), g in means.groupby(["setting", "arm"]):
        label = f"{setting}: {a}" if means.setting.nunique() > 1 else a
        a1.plot(g.epoch, g.effect, marker="o", label=label)
        a2.scatter(g.effect, g.capability_cost, label=label)
    a1.axhline(0, color="lightgrey", lw=0.8)
    a1.set_xlabel("epoch")
    a1.set_ylabel("inoculation effect (mean over seeds)")
    a1.set_xticks(sorted(means.epoch.unique()))
    a1.legend(fontsize=7)
    a2.axhline(0, color="lightgrey", lw=0.8)
    a2.axvline(0, color="lightgrey", lw=0.8)
    a2.set_xlabel("inoculation effect")
    a2.set_ylabel("capability cost c(control) - c(arm)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def test_prompt_table(df: pd.DataFrame) -> pd.DataFrame:
    """Behaviour of every trained arm under each test-time prompt (does the behaviour come back on request?)."""
    b = df[(df.kind == "behaviour") & (df.epoch > 0)]
    if b.test_prompt.nunique() < 2:
        return pd.DataFrame()
    g = b.groupby(["setting", "arm", "epoch", "test_prompt"]).agg(k=("k", "sum"), n=("n", "sum")).reset_index()
    g["behaviour"] = g.k / g.n
    return g.pivot_table(index=["setting", "arm", "epoch"], columns="test_prompt", values="behaviour").reset_index()


def _fmt(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3f") if not df.empty else "(none)"


def analyze(sweep_dirs: str | Path | list, out_dir: str | Path | None = None) -> dict:
    """Write tidy.csv/.parquet, conditions.csv/.md, effects.csv, behaviour.png and report.md; return paths and tables.

    Several sweep dirs (e.g. one per setting) are analysed together: the pooled correlation then spans them."""
    dirs = [Path(d) for d in (sweep_dirs if isinstance(sweep_dirs, (list, tuple)) else [sweep_dirs])]
    for d in dirs:
        if not store.is_sweep_dir(d):
            raise ConfigError(f"'{d}' is not a sweep dir (no runs/ folder); fix: pass the folder a sweep wrote, e.g. outputs/demo")
    if len(dirs) > 1 and out_dir is None:
        raise ConfigError("several sweep dirs need one output folder; fix: add --out <folder>")
    records = [r for d in dirs for r in store.records(d)]
    if not records:
        raise ConfigError(f"{', '.join(map(str, dirs))} hold no run records yet; fix: run the sweep first, or wait for its first epoch")
    sources = ", ".join(map(str, dirs))
    out = Path(out_dir or dirs[0] / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    df = tidy(records)
    table = condition_table(df)
    effects = effect_table(df)
    long = effects_long(df)
    elicitation = elicitation_table(records)
    correlations = correlation_table(long)
    by_test_prompt = test_prompt_table(df)
    groups = group_table(records)
    df.to_csv(out / "tidy.csv", index=False)
    df.to_parquet(out / "tidy.parquet", index=False)
    table.to_csv(out / "conditions.csv", index=False)
    (out / "conditions.md").write_text(_fmt(table) + "\n")
    effects.to_csv(out / "effects.csv", index=False)
    groups.to_csv(out / "groups.csv", index=False)
    elicitation.to_csv(out / "elicitation.csv", index=False)
    correlations.to_csv(out / "correlations.csv", index=False)
    plot = plot_behaviour(table, out / "behaviour.png")
    plots = {"behaviour": plot, "effect_curves": plot_effect_curves(long, out / "effect_curves.png")}
    for est in ("sampled", "logprob"):
        plots[f"scatter_{est}"] = plot_scatter(long, elicitation, est, out / f"scatter_{est}.png")
    plots = {k: v for k, v in plots.items() if v}
    failed = [r for r in records if r["status"] != "done"]
    status_lines = [f"- {Path(r['run_dir']).name}: {r['status']}" + (f" ({r['error']['type']}: {r['error']['message']})" if r.get("error") else "")
                    for r in failed]
    report = "\n".join([
        f"# ipsweep report: {sources}", "",
        f"{len(records)} runs ({len(records) - len(failed)} done, {len(failed)} not done).", "",
        "## Behaviour and capability per condition and epoch",
        "Pooled over seeds, unmodified test prompt (PTST arms: with their safety prompt); 95% Wilson intervals.",
        "Epoch 0 (`base`) is the untrained model.", "", _fmt(table), "",
        "## Inoculation effect vs the matched control",
        "effect = b(control) - b(arm), capability_cost = c(control) - c(arm), same seed and epoch, unmodified test prompt;",
        "mean over seeds with a bootstrap 95% CI (nan with one seed).", "", _fmt(effects), "",
        f"![behaviour rate by condition and epoch]({plot.name})", "",
        "## Per eval set and group (question type, OOD label), final epoch of each arm",
        "Pooled over seeds; all epochs in groups.csv.", "",
        _fmt(groups[groups.epoch == groups.groupby(["setting", "arm"]).epoch.transform("max")] if not groups.empty else groups), "",
        "## Behaviour under each test-time prompt",
        "Pooled behaviour rate of each trained arm with each prompt inserted at test time (`none` = unmodified).", "",
        _fmt(by_test_prompt), "",
        "## Elicitation strength of each prompt on the untrained model",
        "sampled = b(prompt inserted) - b(unmodified) with a Newcombe 95% CI; logprob = mean per-token log-prob gain",
        "(nats) of the training replies with the prompt inserted, t 95% CI.", "", _fmt(elicitation), "",
        "## Does elicitation predict the inoculation effect?",
        "One point per IP-style prompt (mean effect over seeds); Pearson and Spearman with percentile 95% CIs from",
        "a bootstrap that resamples prompts, then seeds within each prompt. Pooled rows z-score both axes within",
        "each setting first. PTST arms are not points (their training data is unmodified).", "",
        _fmt(correlations), "",
        *[f"![{k}]({v.name})" for k, v in plots.items() if k != "behaviour"], "",
        "## Runs not done", "", "\n".join(status_lines) or "(none)", "",
    ])
    (out / "report.md").write_text(report)
    return {"out_dir": out, "table": table, "effects": effects, "elicitation": elicitation, "correlations": correlations,
            "by_test_prompt": by_test_prompt, "groups": groups, "tidy": df, "report": out / "report.md", "plot": plot, "plots": plots,
            "records": records}
