"""The package's ground floor (identity, caches, records on disk, model sources, the config schema, prompts,
the settings' base) imports only itself, without a circle; a job does not load the analysis."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ipsweep"
# the modules everything else builds on; each imports only modules of this set
GROUND = {
    "ipsweep.cache",
    "ipsweep.stats",
    "ipsweep.errors",
    "ipsweep.config",
    "ipsweep.record",
    "ipsweep.prompts",
    "ipsweep.models",
    "ipsweep.identity",
    "ipsweep.store",
    "ipsweep.settings.base",
    "ipsweep.contrast",
}


def _imports(module: str) -> set[str]:
    """The ipsweep modules `module` imports anywhere in its file (a function's deferred import included)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from ipsweep import models` names a module; `from ipsweep.cache import digest` names its module
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found = {s for s in subs if (PACKAGE.parent / (s.replace(".", "/") + ".py")).is_file()}
            out |= found or {node.module}
    return {m for m in out if m.startswith("ipsweep.") and m != module}


def test_the_ground_floor_imports_nothing_above_it_and_has_no_circle():
    graph = {m: _imports(m) for m in GROUND}
    upward = {m: sorted(i - GROUND) for m, i in graph.items() if i - GROUND}
    assert not upward, f"ground-floor modules import from above: {upward}"
    assert not graph["ipsweep.cache"] and not graph["ipsweep.stats"], "they import no ipsweep module"
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import circle: {' -> '.join([*path, m])}"
        if m not in done:
            for n in graph[m]:
                visit(n, (*path, m))
            done.add(m)

    for m in GROUND:
        visit(m, ())


def test_a_job_does_not_import_the_analysis():
    """A job computes its intervals with ipsweep.stats (numpy); the analysis, scipy and statsmodels are for
    `ipsweep analyze`."""
    code = (
        "import sys, ipsweep.job\n"
        "print(sorted(m for m in ('ipsweep.analysis', 'scipy', 'statsmodels') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing ipsweep.job loaded {out.stdout.strip()}"
