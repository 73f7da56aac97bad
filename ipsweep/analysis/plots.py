"""The analysis plots: behaviour by epoch, the trajectory over training, effect by research axis, the
capability vs behaviour frontier, elicitation vs effect. Each returns the file it wrote, or None when the
tables hold nothing to draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on clusters or CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Lay out, write and close a figure (every plot of the analysis and of `ipsweep screen`)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


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
    return save(fig, path)


def plot_trajectory(trajectory: pd.DataFrame, effects: pd.DataFrame, path: Path) -> Path | None:
    """Over training: each arm's effect by epoch, each estimator's correlation with the effects by epoch
    (Spearman across the IP-style prompts; no panel where the design has none), both with 95% CIs; and
    capability cost vs effect."""
    if trajectory.empty:
        return None
    plt = pyplot()
    correlated = trajectory.series.str.startswith("spearman(").any()
    if correlated:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.4))
    else:
        (fig, (a1, a3)), a2 = plt.subplots(1, 2, figsize=(11, 4.4)), None
    several = trajectory.setting.nunique() > 1
    for (setting, values, series), g in trajectory.groupby(["setting", "axis_values", "series"], sort=False):
        g = g.sort_values("epoch")
        label = " ".join(filter(None, [f"{setting}:" if several else "", values, series]))
        ax = a2 if series.startswith("spearman(") else a1
        yerr = [(g.estimate - g.lo).clip(lower=0), (g.hi - g.estimate).clip(lower=0)]
        ax.errorbar(g.epoch, g.estimate, yerr=yerr, marker="o", capsize=3, label=label)
    panels = [(a1, "Inoculation effect by epoch", "effect b(control) - b(arm), share of replies, 95% CI")]
    if correlated:
        panels.append((a2, "Elicitation vs effect by epoch", "Spearman r across IP-style prompts, 95% CI"))
    for ax, title, ylabel in panels:
        ax.axhline(0, color="lightgrey", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted(trajectory.epoch.unique()))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    e = effects.dropna(subset=["effect"])
    for (setting, a), g in e.groupby(["setting", "arm"]):
        a3.scatter(g.effect, g.capability_cost, label=f"{setting}: {a}" if several else a)
    a3.axhline(0, color="lightgrey", lw=0.8)
    a3.axvline(0, color="lightgrey", lw=0.8)
    a3.set_title("Capability cost vs effect (each arm and epoch)")
    a3.set_xlabel("inoculation effect (share of replies)")
    a3.set_ylabel("capability cost c(control) - c(arm), share")
    return save(fig, path)


def plot_axes(axes_table: pd.DataFrame, path: Path) -> Path | None:
    """Effect (95% CI) against each research axis the analysis varies, at each arm's final epoch: one panel
    per axis, one line per prompt and combination of the other varied axes."""
    if axes_table.empty:
        return None
    from ipsweep.analysis.tables import varying_axes

    t = axes_table[axes_table.epoch == axes_table.groupby(["setting", "arm"]).epoch.transform("max")]
    varied = varying_axes(t)
    if not varied:
        return None
    plt = pyplot()
    fig, panels = plt.subplots(1, len(varied), figsize=(5.5 * len(varied), 4.2), squeeze=False)
    for ax, axis in zip(panels[0], varied):
        values = sorted(t[axis].dropna().unique(), key=lambda v: (isinstance(v, str), v))
        x = {v: i for i, v in enumerate(values)}
        others = [a for a in varied if a != axis]
        for key, g in t.dropna(subset=[axis]).groupby(["setting", "prompt", *others], dropna=False):
            g = g.sort_values(axis, key=lambda c: c.map(x))
            label = " ".join(str(k) for k in key[1:])
            yerr = [(g.effect - g.effect_lo).clip(lower=0), (g.effect_hi - g.effect).clip(lower=0)]
            ax.errorbar(g[axis].map(x), g.effect, yerr=yerr, marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(values)), [str(v) for v in values], fontsize=8)
        ax.axhline(0, color="lightgrey", lw=0.8)
        ax.set_xlabel(axis)
        ax.set_ylabel("effect b(control) - b(arm), 95% CI")
        ax.set_title(f"Inoculation effect by {axis} (final epoch)")
        ax.legend(fontsize=7)
    return save(fig, path)


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
    return save(fig, path)


def plot_scatter(effects: pd.DataFrame, elicitation: pd.DataFrame, estimator: str, path: Path) -> Path | None:
    """Elicitation (x, 95% CI) vs inoculation effect (y, 95% CI over seeds x items), last epoch, with an OLS
    fit. Needs at least 3 prompts with an estimate in some setting."""
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
    return save(fig, path)


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
