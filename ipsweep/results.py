"""RESULTS.md is generated, not typed: its tables are filled from analysis CSVs committed in the repo.

An experiment's run records (metrics only: no checkpoints, samples or W&B files) are committed under
docs/results/<name>/runs/, and `ipsweep analyze` of that folder writes docs/results/<name>/analysis/.
RESULTS.md marks each generated table with

    <!-- table: <csv path relative to docs/results> | <columns, comma-separated> | <pandas query or empty> -->
    ...generated markdown... <!-- /table -->

`ipsweep results` rewrites every such block from the CSVs; `ipsweep results --check` (and a test) fails
when RESULTS.md disagrees with them, or when its prose cites a decimal that no generated table of the same
section holds. Figures quoted from the literature go between `<!-- literature -->` and `<!-- /literature -->`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd

from ipsweep.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent  # the checkout (results are committed files, not package data)
RESULTS_MD = ROOT / "RESULTS.md"
RESULTS_DIR = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- table: (?P<spec>[^\n]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def export(sweep_dir: str | Path, dest: str | Path) -> int:
    """Copy a sweep's run records into `dest`/runs/<run>/record.json, without local paths that mean nothing
    elsewhere (checkpoint folders); returns the number of records."""
    dest = Path(dest)
    shutil.rmtree(dest / "runs", ignore_errors=True)
    n = 0
    for path in sorted(Path(sweep_dir).glob("runs/*/record.json")):
        record = json.loads(path.read_text())
        for entry in record["epochs"].values():
            entry.pop("checkpoint", None)
        out = dest / "runs" / path.parent.name / "record.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, sort_keys=True))
        n += 1
    # the sweep command, its manifest (declared primary test) and a declared prediction's frozen screen
    for name in ("multirun.yaml", "sweep.json", "prediction.csv"):
        if (Path(sweep_dir) / name).is_file():
            shutil.copy(Path(sweep_dir) / name, dest / name)
    return n


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.2f}"
    return "" if v is None else str(v)


def anchor(heading: str) -> str:
    """A markdown heading's link target, as GitHub makes it."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def findings(path: Path, root: Path = RESULTS_DIR) -> pd.DataFrame:
    """The findings table a findings.yaml names: per entry, its question, the answer filled from one row of
    an analysis CSV (`answer`: a template of that row's columns, floats to 2 decimals), and a link to the
    section of RESULTS.md that holds it. An entry whose query selects no row or several is an error."""
    import yaml

    rows = []
    for entry in yaml.safe_load(path.read_text()):
        df = pd.read_csv(root / entry["csv"]).query(entry["query"])
        if len(df) != 1:
            raise ConfigError(
                f"{path.name}: '{entry['question']}' selects {len(df)} rows of {entry['csv']}; fix: a query "
                "that selects one row"
            )
        row = {k: f"{v:.2f}" if isinstance(v, float) else v for k, v in df.iloc[0].items()}
        answer = entry["answer"].format(**row)
        section = f"[{entry['experiment']}]({anchor(entry['section'])})"
        rows.append({"question": entry["question"], "answer": answer, "experiment": section})
    return pd.DataFrame(rows)


def render_table(spec: str, root: Path = RESULTS_DIR) -> str:
    """The markdown table a block's spec names: `csv | columns | query` (a .yaml: findings())."""
    csv, cols, query = (part.strip() for part in (spec.split("|") + ["", ""])[:3])
    df = findings(root / csv, root) if csv.endswith(".yaml") else pd.read_csv(root / csv)
    if query:
        df = df.query(query)
    cols = [c.strip() for c in cols.split(",")] if cols else list(df.columns)
    missing = [c for c in cols if c not in df]
    if missing:
        raise KeyError(f"{csv} has no column(s) {', '.join(missing)}")
    df = df[cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def render(text: str, root: Path = RESULTS_DIR) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render_table(m.group("spec"), root) + m.group(4), text)


def stale_blocks(path: Path = RESULTS_MD, root: Path = RESULTS_DIR) -> list[str]:
    """Specs of the blocks whose text differs from what the CSVs give."""
    text = path.read_text()
    return [
        m.group("spec")
        for m in BLOCK.finditer(text)
        if m.group("body") != render_table(m.group("spec"), root)
    ]


def update(path: Path = RESULTS_MD, root: Path = RESULTS_DIR) -> int:
    text = path.read_text()
    path.write_text(render(text, root))
    return len(BLOCK.findall(text))


NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?!\w|\.\d)")  # a decimal, a sentence's full stop after it
LITERATURE = re.compile(r"<!-- literature -->.*?<!-- /literature -->", re.S)
# what is not prose: generated tables, quoted literature, fenced and inline code, images
FENCED, INLINE, IMAGE = re.compile(r"```.*?```", re.S), re.compile(r"`[^`\n]*`"), re.compile(r"!\[.*?\)")
NOT_PROSE = (BLOCK, LITERATURE, FENCED, INLINE, IMAGE)


def _sections(path: Path) -> list[tuple[str, str, str]]:
    """RESULTS.md's sections (split at `## `): their title, text, and prose (NOT_PROSE blanked out)."""
    out = []
    for section in re.split(r"\n(?=## )", path.read_text()):
        prose = section
        for pattern in NOT_PROSE:
            prose = pattern.sub(" ", prose)
        out.append((section.splitlines()[0].lstrip("# ")[:60], section, prose))
    return out


def unsourced_numbers(path: Path = RESULTS_MD) -> list[str]:
    """Decimals in RESULTS.md's prose that no generated table of their section (a `## ` heading) holds, as
    'section: number'. A claim cites the table beside it; a figure from the literature is marked as such."""
    out = []
    for title, section, prose in _sections(path):
        held = {abs(float(x)) for m in BLOCK.finditer(section) for x in NUMBER.findall(m.group("body"))}
        out += [f"{title}: {x}" for x in NUMBER.findall(prose) if abs(float(x)) not in held]
    return out


# Words that draw a conclusion, and what the prose must do instead (a comparison's words are generated:
# comparisons.csv's verdicts, ipsweep/analysis/comparisons.py).
READINGS = {
    re.compile(r"\boverlap", re.I): "two intervals overlapping is not a comparison; cite the paired "
    "comparison's verdict (comparisons.csv)",
    re.compile(r"\bdo(es)? not differ\b", re.I): "say 'no difference detected' with the smallest detectable "
    "difference (comparisons.csv)",
    # ('a test of no effect' names the null hypothesis)
    re.compile(r"(?<!of )\bno (difference|effect)\b(?!( was| is)? detected)", re.I): "say 'no ... detected' "
    "(an interval that includes 0 does not show there is none)",
}
INTERVAL = re.compile(r"\[(-?\d+\.\d+), (-?\d+\.\d+)\]")
ZERO_CLAIM = re.compile(r"\b(excludes|include[sd]?) 0\b")
WINDOW = 50  # characters before a claim about 0 that its interval is cited in


def _sentences(prose: str) -> list[str]:
    return re.split(r"(?<=[.;:!?])\s+(?=[A-Z*(])|\n\s*\n|\n- ", prose)


def verdict_problems(path: Path = RESULTS_MD) -> list[str]:
    """Prose (outside generated tables, literature, code) that reads a conclusion the numbers do not give:
    a word of READINGS, or 'excludes 0' / 'includes 0' right after an interval (WINDOW) that says
    otherwise. As 'section: problem: the sentence'."""
    out = []
    for title, _, prose in _sections(path):
        for sentence in _sentences(prose):
            said = " ".join(sentence.split())
            for word, fix in READINGS.items():
                if word.search(said):
                    out.append(f"{title}: {fix}: '{said[:160]}'")
            for claim in ZERO_CLAIM.finditer(said):
                before = INTERVAL.findall(said[max(claim.start() - WINDOW, 0) : claim.start()])
                if not before:
                    continue
                lo, hi = map(float, before[-1])
                excludes = lo > 0 or hi < 0
                if excludes != (claim.group(1) == "excludes"):
                    out.append(
                        f"{title}: '{claim.group(0)}' after [{lo:.2f}, {hi:.2f}], which "
                        f"{'excludes' if excludes else 'includes'} 0: '{said[:160]}'"
                    )
    return out
