"""report.md and the `ipsweep analyze` summary, both read from one declarative list of sections
(sections.yaml): each names its heading, prose, table, columns, notes and figures."""

from __future__ import annotations

import platform
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

from ipsweep import store
from ipsweep.analysis.frames import AXES
from ipsweep.analysis.tables import fmt_ci
from ipsweep.config import SUBSETS

SECTIONS_FILE = Path(__file__).with_name("sections.yaml")
WIDTH = 100  # the columns `ipsweep analyze` fits what it prints to
MIN_PROMPTS = 3  # the fewest IP-style prompts a correlation is computed from (correlation.correlation)
# the experiment preset that sweeps a setting's library for the elicitation-vs-effect correlation
CORRELATION_PRESETS = {
    "trait_pair": "elicitation_correlation",
    "trait_pair_greeting": "elicitation_correlation_greeting",
    "gcd_sycophancy": "elicitation_correlation_gcd",
}


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
    cli_columns: list[str] | None = None  # the columns it prints (None: `columns`)
    cli_view: str | None = None  # the rows it prints (None: `view`)
    cli_notes: list[str] = field(default_factory=list)  # the NOTES it prints


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


def _computed(t: pd.DataFrame) -> pd.DataFrame:
    """The correlation rows with a Pearson or Spearman estimate (too few prompts, or no spread: nan), each
    interval also as one '[lo, hi]' column (`pearson_ci`, `spearman_ci`)."""
    cols = [c for c in ("pearson", "spearman") if c in t]
    t = t[t[cols].notna().any(axis=1)] if cols else t.iloc[:0]
    return t.assign(
        **{
            f"{c}_ci": [fmt_ci(lo, hi) for lo, hi in zip(t[f"{c}_lo"], t[f"{c}_hi"])]
            for c in cols
            if f"{c}_lo" in t
        }
    )


VIEWS = {
    "on_frontier": _on_frontier,
    "final_epoch": _final_epoch,
    "by_epoch": _by_epoch,
    "computed": _computed,
}


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


def _span(values) -> str:
    lo, hi = int(min(values)), int(max(values))
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _not_computed(tables: dict[str, pd.DataFrame]) -> str:
    """Why rows of the correlation table are nan: what the design lacks (>= 3 IP-style prompts per setting
    and epoch, estimates or effects that differ), and the preset that has it. Empty when every row is
    computed."""
    c, effects = tables["correlations"], tables["effects"]
    missing = c.drop(_computed(c).index) if not c.empty else c
    if missing.empty:
        return ""
    pooled = missing.design.isna()
    few = missing[~pooled & (missing.points < MIN_PROMPTS)]
    key = ["setting", "design", "variant", "epoch", "estimator"]
    ip_style = few[few.prompts == SUBSETS["ip_style"]]
    covered = set(map(tuple, ip_style[key].fillna("").to_numpy()))
    inoculation = few[few.prompts == SUBSETS["inoculation"]]
    inoculation = inoculation[[k not in covered for k in map(tuple, inoculation[key].fillna("").to_numpy())]]
    ip = effects[effects.condition == "ip"] if "condition" in effects else effects
    reasons = []
    for rows, kind, arms in (
        (ip_style, "IP-style", ip),
        (inoculation, "inoculation-role", ip[ip.role == "inoculation"] if "role" in ip else ip),
    ):
        if len(rows):
            names = ", ".join(dict.fromkeys(arms[arms.design.isin(rows.design)].prompt))
            reasons.append(
                f"a correlation needs >= {MIN_PROMPTS} {kind} prompts per setting and epoch, and this design "
                f"has {_span(rows.points)}" + (f" ({names})" if names else "")
            )
    flat = missing[~pooled & (missing.points >= MIN_PROMPTS)]
    if len(flat):
        estimators = ", ".join(dict.fromkeys(flat.estimator))
        reasons.append(f"with {estimators}, every prompt has the same estimate or the same effect")
    if pooled.any():
        reasons.append("the pooled rows have fewer than 2 settings or designs with a correlation to pool")
    text = f"Not computed ({len(missing)} of {len(c)} rows of correlations.csv): {'; '.join(reasons)}."
    if len(few):
        settings = list(dict.fromkeys(few.setting))
        presets = [
            f"`experiment={CORRELATION_PRESETS[s]}` ({s})" for s in settings if s in CORRELATION_PRESETS
        ]
        others = [s for s in settings if s not in CORRELATION_PRESETS]
        if presets:
            text += f" The preset that has them: {', '.join(presets)}."
        if others:
            text += f" For {', '.join(others)}: sweep more of its library's IP-style prompts (`prompt=...`)."
    return text


NOTES = {"degenerate": _degenerate, "exploratory": _exploratory, "not_computed": _not_computed}


def shown(section: Section, tables: dict[str, pd.DataFrame], cli: bool = False) -> pd.DataFrame:
    """The part of the section's table it shows: its view, its columns (those the table has); with `cli`,
    what `ipsweep analyze` prints of it (cli_view, cli_columns, where the section names them)."""
    t = tables[section.table]
    if t.empty:
        return t
    view = (section.cli_view or section.view) if cli else section.view
    columns = (section.cli_columns or section.columns) if cli else section.columns
    if view:
        t = VIEWS[view](t)
    return t[[c for c in columns if c in t]] if columns else t


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
        out += [line for n in s.notes if (note := NOTES[n](tables)) for line in (note, "")]
        figures = [f"![{alt}]({plots[name].name})" for name, alt in s.plots.items() if name in plots]
        out += [*figures, ""] if figures else []
    return "\n".join(out)


# research axes: printed where they vary (then they name a row), left out where they do not
AXIS_COLUMNS = (*AXES, "paraphrases")
# columns that name a row: repeated in each block of a table split to fit the terminal
KEYS = (
    *AXIS_COLUMNS,
    "setting",
    "design",
    "variant",
    "sweep",
    "arm",
    "prompt",
    "series",
    "estimator",
    "prompts",
    "epoch",
    "test_prompt",
    "eval_set",
    "group",
    "panel",
)
# label columns that go to a line above the table when every row has the same value
LABELS = (
    "setting",
    "model",
    "variant",
    "estimator",
    "prompts",
    "behaviour_metric",
    "capability_metric",
    "items",
    "statistic",
)


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.2f}"
    return "" if v is None else str(v)


def _simple(df: pd.DataFrame) -> str:
    """A plain-text table: a header, a rule, numbers right-aligned, two spaces between columns."""
    cols = [(str(c), [_cell(v) for v in df[c]], pd.api.types.is_numeric_dtype(df[c])) for c in df]
    widths = [max([len(name), *map(len, cells)]) for name, cells, _ in cols]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, (_, _, num) in zip(values, widths, cols)
        ).rstrip()

    rows = [line([cells[i] for _, cells, _ in cols]) for i in range(len(df))]
    return "\n".join([line([name for name, _, _ in cols]), "  ".join("-" * w for w in widths), *rows])


def _wide(text: str) -> int:
    return max(map(len, text.splitlines()), default=0)


def terminal(df: pd.DataFrame, width: int = WIDTH) -> str:
    """A table as `ipsweep analyze` prints it, to fit `width` columns: empty columns, and research axes that
    do not vary, left out; a label column with one value in every row said once above it (`setting=...`);
    and a table still too wide split into blocks of columns, each repeating the columns that name its rows."""
    if df.empty:
        return "(none)"
    blank = [
        c for c in df if df[c].map(lambda v: v is None or v == "" or (isinstance(v, float) and v != v)).all()
    ]
    fixed = [c for c in df if c in AXIS_COLUMNS and df[c].astype(str).nunique() == 1]
    df = df.drop(columns=blank + fixed)
    df = df.assign(
        **{c: df[c].map(lambda v: f"{v:g}" if isinstance(v, float) else v) for c in AXIS_COLUMNS if c in df}
    )
    same = [c for c in df if c in LABELS and df[c].nunique(dropna=False) == 1]
    head = ", ".join(f"{c}={_cell(df[c].iloc[0])}" for c in same)
    df = df.drop(columns=same)
    blocks = [list(df.columns)]
    if _wide(_simple(df)) > width:
        keys = [c for c in df if c in KEYS]
        blocks = [[]]
        for c in [c for c in df if c not in keys]:
            if blocks[-1] and _wide(_simple(df[keys + blocks[-1] + [c]])) > width:
                blocks.append([])
            blocks[-1].append(c)
        blocks = [keys + b for b in blocks]
    tables = "\n\n".join(_simple(df[b]) for b in blocks)
    return "\n".join([*textwrap.wrap(head, width), tables])


def summary(tables: dict[str, pd.DataFrame], width: int = WIDTH) -> str:
    """What `ipsweep analyze` prints: the sections marked `cli`, each with the columns and notes it names
    for the terminal (cli_columns, cli_notes), fitted to `width` columns; report.md and the CSVs hold the
    rest."""
    parts = []
    for s in sections():
        if not s.cli or tables[s.table].empty:
            continue
        t = shown(s, tables, cli=True)
        notes = [note for n in s.cli_notes if (note := NOTES[n](tables).replace("`", ""))]
        body = [terminal(t, width)] if not t.empty or not notes else []
        wrapped = [textwrap.fill(n, width, break_on_hyphens=False, break_long_words=False) for n in notes]
        parts.append("\n".join([s.title.lstrip("# "), *body, *wrapped]))
    if parts:
        parts.append("Every column and section, with the intervals' methods, is in report.md and the CSVs.")
    return "\n\n".join(parts)
