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
                        "loss": entry.get("loss"), **m,
                    })
    return pd.DataFrame(rows)


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
            row[kind] = r["rate"]
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


def effect_table(df: pd.DataFrame) -> pd.DataFrame:
    """Inoculation effect b(control) - b(arm) and capability cost c(control) - c(arm), matched on seed and
    epoch, both under the unmodified test prompt; mean over seeds with a bootstrap 95% CI."""
    plain = df[(df.test_prompt == "none") & df.kind.isin(["behaviour", "capability"]) & (df.epoch > 0)]
    wide = plain.pivot_table(index=["setting", "seed", "epoch", "arm"], columns="kind", values="rate").reset_index()
    control = wide[wide.arm == "control"].drop(columns="arm")
    merged = wide[wide.arm != "control"].merge(control, on=["setting", "seed", "epoch"], suffixes=("", "_control"))
    if merged.empty:
        return pd.DataFrame()
    merged["effect"] = merged.behaviour_control - merged.behaviour
    merged["capability_cost"] = merged.capability_control - merged.capability
    out = []
    for (setting, a, epoch), g in merged.groupby(["setting", "arm", "epoch"]):
        lo, hi = bootstrap_mean_ci(g.effect)
        clo, chi = bootstrap_mean_ci(g.capability_cost)
        out.append({"setting": setting, "arm": a, "epoch": epoch, "seeds": len(g),
                    "effect": g.effect.mean(), "effect_ci": f"[{lo:.2f}, {hi:.2f}]",
                    "capability_cost": g.capability_cost.mean(), "capability_cost_ci": f"[{clo:.2f}, {chi:.2f}]"})
    return pd.DataFrame(out)


def plot_behaviour(table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(table.setting))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        t = table[table.setting == setting]
        base = t[t.arm == "base"]
        for a in [a for a in dict.fromkeys(t.arm) if a != "base"]:
            rows = pd.concat([base.assign(arm=a), t[t.arm == a]]).sort_values("epoch")
            lo = rows.behaviour - rows.behaviour_ci.map(lambda s: float(s.strip("[]").split(",")[0]))
            hi = rows.behaviour_ci.map(lambda s: float(s.strip("[]").split(",")[1])) - rows.behaviour
            ax.errorbar(rows.epoch, rows.behaviour, yerr=[lo, hi], marker="o", capsize=3, label=a)
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


def _fmt(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3f") if not df.empty else "(none)"


def analyze(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write tidy.csv/.parquet, conditions.csv/.md, effects.csv, behaviour.png and report.md; return paths and tables."""
    sweep_dir = Path(sweep_dir)
    if not store.is_sweep_dir(sweep_dir):
        raise ConfigError(f"'{sweep_dir}' is not a sweep dir (no runs/ folder); fix: pass the folder a sweep wrote, e.g. outputs/demo")
    records = store.records(sweep_dir)
    if not records:
        raise ConfigError(f"'{sweep_dir}' holds no run records yet; fix: run the sweep first, or wait for its first epoch")
    out = Path(out_dir or sweep_dir / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    df = tidy(records)
    table = condition_table(df)
    effects = effect_table(df)
    df.to_csv(out / "tidy.csv", index=False)
    df.to_parquet(out / "tidy.parquet", index=False)
    table.to_csv(out / "conditions.csv", index=False)
    (out / "conditions.md").write_text(_fmt(table) + "\n")
    effects.to_csv(out / "effects.csv", index=False)
    plot = plot_behaviour(table, out / "behaviour.png")
    failed = [r for r in records if r["status"] != "done"]
    status_lines = [f"- {Path(r['run_dir']).name}: {r['status']}" + (f" ({r['error']['type']}: {r['error']['message']})" if r.get("error") else "")
                    for r in failed]
    report = "\n".join([
        f"# ipsweep report: {sweep_dir}", "",
        f"{len(records)} runs ({len(records) - len(failed)} done, {len(failed)} not done).", "",
        "## Behaviour and capability per condition and epoch",
        "Pooled over seeds, unmodified test prompt (PTST arms: with their safety prompt); 95% Wilson intervals.",
        "Epoch 0 (`base`) is the untrained model.", "", _fmt(table), "",
        "## Inoculation effect vs the matched control",
        "effect = b(control) - b(arm), capability_cost = c(control) - c(arm), same seed and epoch, unmodified test prompt;",
        "mean over seeds with a bootstrap 95% CI (nan with one seed).", "", _fmt(effects), "",
        f"![behaviour rate by condition and epoch]({plot.name})", "",
        "## Runs not done", "", "\n".join(status_lines) or "(none)", "",
    ])
    (out / "report.md").write_text(report)
    return {"out_dir": out, "table": table, "effects": effects, "report": out / "report.md", "plot": plot, "records": records}
