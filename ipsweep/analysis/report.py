"""report.md and the `ipsweep analyze` summary, both read from one declarative list of sections
(sections.yaml): each names its heading, prose, table, columns, notes and figures."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

from ipsweep import store

SECTIONS_FILE = Path(__file__).with_name("sections.yaml")


@dataclass(frozen=True)
class Section:
    title: str
    text: str = ""
    table: str | None = None  # a table of the analysis
    lines: str | None = None  # or a list of lines (runs not done, damaged records)
    columns: list[str] | None = None  # None: every column
    view: str | None = None  # a named subset of the table (VIEWS)
    notes: list[str] = field(default_factory=list)  # NOTES after the table
    plots: dict[str, str] = field(default_factory=dict)  # figure name -> alt text
    cli: bool = False  # also printed by `ipsweep analyze`


def sections() -> list[Section]:
    return [Section(**s) for s in yaml.safe_load(SECTIONS_FILE.read_text())]


def _on_frontier(t: pd.DataFrame) -> pd.DataFrame:
    return t[t.on_frontier]


def _final_epoch(t: pd.DataFrame) -> pd.DataFrame:
    return t[t.epoch == t.groupby(["setting", "arm"]).epoch.transform("max")]


def _by_epoch(t: pd.DataFrame) -> pd.DataFrame:
    """The trajectory table with a column per epoch: 'estimate [lo, hi]'."""
    cell = [f"{e:.2f} {ci}" for e, ci in zip(t.estimate, t.ci)]
    keys = ["setting", "axis_values", "series"]
    wide = t.assign(cell=cell).pivot(index=keys, columns="epoch", values="cell")
    order = t.drop_duplicates(keys)[keys]
    wide = wide.reindex(pd.MultiIndex.from_frame(order))
    wide.columns = [f"epoch {e}" for e in wide.columns]
    return wide.reset_index().fillna("")


VIEWS = {"on_frontier": _on_frontier, "final_epoch": _final_epoch, "by_epoch": _by_epoch}


def _degenerate(tables: dict[str, pd.DataFrame]) -> str:
    arms = [
        f"{r.arm} epoch {r.epoch}"
        for r in tables["effects"].itertuples()
        if "degenerate" in str(getattr(r, "effect_method", ""))
    ]
    listed = ", ".join(arms) or "none"
    return f"Degenerate intervals (every seed and item gives the same difference): {listed}."


def _exploratory(tables: dict[str, pd.DataFrame]) -> str:
    from ipsweep.analysis.prediction import tests_computed

    n, declared = tests_computed(tables["correlations"]), tables["primary"]
    if declared.empty:
        return (
            f"No primary test was declared before the runs (`primary.estimator=...` in the sweep): all {n} "
            "correlation tests of this analysis are exploratory."
        )
    late = declared[~declared.pre_registered.astype(bool)]
    return f"The other correlation tests of this analysis ({n} computed in all) are exploratory." + (
        f" Declared after runs had started, so not pre-registered: {', '.join(late.sweep)}."
        if len(late)
        else ""
    )


NOTES = {"degenerate": _degenerate, "exploratory": _exploratory}


def shown(section: Section, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The part of the section's table it shows: its view, its columns (those the table has)."""
    t = tables[section.table]
    if t.empty:
        return t
    if section.view:
        t = VIEWS[section.view](t)
    return t[[c for c in section.columns if c in t]] if section.columns else t


def markdown(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt) if not df.empty else "(none)"


def _engines(record: dict) -> set[str]:
    """The engines (version, dtype) that made a record's evaluations, from each evaluation's protocol."""
    out = set()
    for epoch in record.get("epochs", {}).values():
        for evaluation in epoch.get("evals", {}).values():
            p = evaluation.get("protocol")
            out.add(
                f"{p['engine']} {p['version']} ({p['dtype']})" if p else "not recorded (before protocols)"
            )
    return out


def provenance(records: list[dict], dirs: list[Path]) -> list[str]:
    """Who made these numbers: the analysis (date, ipsweep version and commit, machine) and the runs (models,
    code versions, machines, the evaluation engines, the sweep commands from each sweep's multirun.yaml)."""

    def values(get) -> str:
        return ", ".join(sorted({str(v) for r in records if (v := get(r))})) or "unknown"

    def version(r: dict, name: str):
        return (r.get("versions") or {}).get(name)

    code = store.code_version()
    lines = [
        f"- analysed {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} with ipsweep {code['ipsweep']}"
        + (f" (commit {code['commit']})" if "commit" in code else ""),
        f"- runs: model {values(lambda r: r['model'])}; made by ipsweep commit "
        f"{values(lambda r: version(r, 'commit'))}, torch {values(lambda r: version(r, 'torch'))}; "
        f"on {values(lambda r: ((r.get('attempts') or [{}])[-1]).get('host'))}",
    ]
    lines.append(f"- evaluated by: {', '.join(sorted(set().union(*map(_engines, records)))) or 'unknown'}")
    for d in dirs:
        path = d / "multirun.yaml"
        if path.is_file():
            overrides = OmegaConf.select(OmegaConf.load(path), "hydra.overrides.task") or []
            lines.append(f"- sweep command: `python launch.py -m {' '.join(map(str, overrides))}`")
    return lines


def render(
    header: list[str],
    tables: dict[str, pd.DataFrame],
    plots: dict[str, Path],
    lines: dict[str, list[str]],
) -> str:
    """report.md: the header, then each section (heading, prose, table, notes, figures)."""
    out = [*header, ""]
    for s in sections():
        out += [s.title, *([s.text] if s.text else []), ""]
        if s.table:
            out += [markdown(shown(s, tables)), ""]
        else:
            out += ["\n".join(lines[s.lines]) or "(none)", ""]
        out += [line for n in s.notes for line in (NOTES[n](tables), "")]
        figures = [f"![{alt}]({plots[name].name})" for name, alt in s.plots.items() if name in plots]
        out += [*figures, ""] if figures else []
    return "\n".join(out)


def summary(tables: dict[str, pd.DataFrame]) -> str:
    """What `ipsweep analyze` prints: the tables of the sections marked `cli`, with the report's columns."""
    parts = [
        f"{s.title.lstrip('# ')}\n{markdown(shown(s, tables), '.2f')}"
        for s in sections()
        if s.cli and not tables[s.table].empty
    ]
    return "\n\n".join(parts)
