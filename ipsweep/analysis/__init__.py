"""Read a sweep's run records and build the tables, plots and report. Reads records only, never logs.

frames (records -> tidy frames and the keys that pair an arm with its control), tables (the statistical
tables), inference (intervals, tests, power), plots, report (report.md and the CLI summary)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ipsweep import contrast, plan, store
from ipsweep.analysis import comparisons, frames, plots, prediction, report, tables
from ipsweep.config import ESTIMATORS
from ipsweep.errors import ConfigError


@dataclass(frozen=True)
class Analysis:
    """What `analyze` wrote: the folder, its tables by name (each also `<name>.csv`), plots and report, and
    the records it read."""

    out_dir: Path
    tables: dict[str, pd.DataFrame]
    plots: dict[str, Path]
    report: Path
    records: list[dict]

    @property
    def not_done(self) -> list[dict]:
        """Runs that failed or were interrupted: in no table."""
        return [r for r in self.records if r["status"] != "done"]


def _declared(d: Path, records: list[dict]) -> list[dict]:
    """The sweep dir's declared primary test (plan.read_primary), with the time its first run started."""
    test = plan.read_primary(d)
    starts = [a["started"] for r in records for a in r.get("attempts", [])[:1]]
    return [{**test, "sweep": str(d), "first_run": min(starts, default=None)}] if test else []


def _records(dirs: list[Path], skip_damaged: bool) -> tuple[list[dict], list, list[dict]]:
    """The sweeps' run records, the damaged ones left out (an error unless skip_damaged), and the primary
    tests the sweeps declared."""
    for d in dirs:
        if not store.is_sweep_dir(d):
            raise ConfigError(
                f"'{d}' is not a sweep dir (no runs/ folder); fix: pass the folder a sweep wrote, e.g. "
                "outputs/demo"
            )
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
    frames.check_controls(records)
    declared = [t for d, (good, _) in zip(dirs, scans) for t in _declared(d, good)]
    return records, damaged, declared


def build_tables(
    records: list[dict],
    n_permutations: int,
    sources: str,
    screened: pd.DataFrame | None = None,
    declared: list[dict] = (),
    compare: list[str] = (),
) -> dict[str, pd.DataFrame]:
    """Every table of an analysis, by name. `screened`: elicitation estimates replacing the recorded ones;
    `declared`: the sweeps' primary tests (_declared); `compare`: contrasts of arms (ipsweep/contrast.py)."""
    its, arms = frames.item_outcomes(records), frames.arm_evaluations(records)
    if its.empty:
        raise ConfigError(
            f"the records in {sources} have no per-item outcomes (made before run signature v3); "
            "fix: rerun the sweep with this version (it retrains under the new signature)"
        )
    if screened is not None:
        arms = frames.use_screened(arms, screened)
    metrics = frames.metric_rows(records)
    conditions = tables.condition_table(arms, its)
    effects, per_seed = tables.effect_table(arms, its)
    elicitation = frames.elicitation_table(records) if screened is None else screened
    correlations, influence = prediction.correlation_table(effects, elicitation, n_permutations)
    return {
        "axes": tables.axes_table(effects),
        "trajectory": tables.trajectory_table(effects, correlations),
        "primary": prediction.primary_table(correlations, list(declared), effects, elicitation),
        "tidy": metrics,
        "items": its,
        "conditions": conditions,
        "groups": tables.condition_table(arms, its, by=("eval_set", "group")),
        "effects": effects,
        "comparisons": comparisons.comparison_table(its, arms, compare),
        "effects_per_seed": per_seed,
        "elicitation": elicitation,
        "correlations": correlations,
        "influence": influence,
        "power": prediction.power_table(conditions, effects),
        "leaks": tables.leak_table(records, its),
        "frontier": tables.frontier_table(conditions),
        "capability_by_behaviour": tables.capability_by_behaviour_table(its),
        "by_test_prompt": tables.test_prompt_table(metrics),
    }


def draw(t: dict[str, pd.DataFrame], out: Path) -> dict[str, Path]:
    """The plots there is something to draw for, by name."""
    drawn = {
        "behaviour": plots.plot_behaviour(t["conditions"], out / "behaviour.png"),
        "trajectory": plots.plot_trajectory(t["trajectory"], t["effects"], out / "trajectory.png"),
        "axes": plots.plot_axes(t["axes"], out / "axes.png"),
        "frontier": plots.plot_frontier(t["frontier"], out / "frontier.png"),
    }
    for est in ESTIMATORS:
        drawn[f"scatter_{est}"] = plots.plot_scatter(
            t["effects"], t["elicitation"], est, out / f"scatter_{est}.png"
        )
    return {k: v for k, v in drawn.items() if v}


def analyze(
    sweep_dirs: str | Path | list,
    out_dir: str | Path | None = None,
    n_permutations: int = 9999,
    skip_damaged: bool = False,
    elicitation_from: list | None = None,
    compare: list[str] = (),
) -> Analysis:
    """Write the tables (CSV), plots and report.md of one or several sweeps.

    Several sweep dirs (e.g. one per setting) are analysed together: the pooled correlation then spans them.
    elicitation_from: `ipsweep screen` tables whose estimates replace those the runs recorded.
    compare: contrasts of arms to compute besides the default comparisons and those the sweeps' manifests
    declare (a preset's `compare:`; ipsweep/contrast.py)."""
    dirs = [Path(d) for d in (sweep_dirs if isinstance(sweep_dirs, (list, tuple)) else [sweep_dirs])]
    if len(dirs) > 1 and out_dir is None:
        raise ConfigError("several sweep dirs need one output folder; fix: add --out <folder>")
    records, damaged, declared = _records(dirs, skip_damaged)
    sources = ", ".join(map(str, dirs))
    frozen = [d["prediction"] for d in declared if d.get("prediction")]
    if elicitation_from is None and frozen:  # the sweep declared its prediction: use those estimates
        elicitation_from = frozen
    screened = frames.screened_elicitation(elicitation_from, records) if elicitation_from else None
    compare = list(dict.fromkeys([*(c for d in dirs for c in plan.read_comparisons(d)), *compare]))
    for text in compare:
        try:
            contrast.parse(text)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    t = build_tables(records, n_permutations, sources, screened, declared, compare)
    out = Path(out_dir or dirs[0] / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    for name, table in t.items():
        if name != "by_test_prompt":
            table.to_csv(out / f"{name}.csv", index=False)
    t["items"].to_parquet(out / "items.parquet", index=False)
    (out / "conditions.md").write_text(report.markdown(t["conditions"]) + "\n")
    drawn = draw(t, out)
    result = Analysis(out_dir=out, tables=t, plots=drawn, report=out / "report.md", records=records)
    failed = result.not_done
    header = [
        f"# ipsweep report: {sources}",
        "",
        *report.provenance(records, dirs),
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
    ]
    lines = {
        "runs_not_done": [
            f"- {Path(r['run_dir']).name}: {r['status']}"
            + (f" ({r['error']['type']}: {r['error']['message']})" if r.get("error") else "")
            for r in failed
        ],
        "damaged": [f"- {e}" for e in damaged],
    }
    result.report.write_text(report.render(header, t, drawn, lines))
    return result
