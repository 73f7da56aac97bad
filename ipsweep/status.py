"""Where every point of a sweep stands: done / running / requeued / interrupted / failed / pending.

Read from files only (the manifest and the run records), so it works the same for every launcher
and from any machine that sees the sweep dir. A run whose record says "running" but whose lock no
process holds was killed (kill -9, node failure, time limit without requeue): rerunning the sweep
resumes it from its last finished epoch.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd

from ipsweep import cache, plan, store


def slurm_queue() -> set[str]:
    """Job ids SLURM still has queued or running (empty where there is no SLURM)."""
    if not shutil.which("squeue"):
        return set()
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(out.stdout.split()) if out.returncode == 0 else set()


def why_new(point: dict) -> str:
    """For a point with no record: if a run of the same setting, prompt and seed exists under another
    signature, what differs in the inputs (edited data files, other model weights); else ''."""
    run_dir = Path(point["run_dir"])
    prefix = run_dir.name.rsplit("-", 1)[0]
    for other in sorted(run_dir.parent.glob(f"{prefix}-*/record.json")):
        old = (cache.read_json(other) or {}).get("config", {}).get("inputs")
        new = point.get("inputs")
        if old is None or new is None:
            continue
        changed = sorted(
            f
            for f in {*old.get("data", {}), *new.get("data", {})}
            if old.get("data", {}).get(f) != new.get("data", {}).get(f)
        )
        if old.get("model_weights") != new.get("model_weights"):
            changed.append("model weights")
        return (
            f"new run: {', '.join(changed)} changed since {other.parent.name}"
            if changed
            else f"new run: the config differs from {other.parent.name}"
        )
    return ""


def point_state(point: dict, queued: set[str] = frozenset()) -> dict:
    run = store.Run(point["run_dir"])
    try:
        record = run.load()
    except store.DamagedRecord as e:
        return {
            "state": "corrupt",
            "epochs_done": 0,
            "detail": f"{e}; fix: rerun the sweep (the damaged file is kept beside as record.damaged-*.json)",
        }
    if record is None:
        return {"state": "pending", "epochs_done": 0, "detail": why_new(point)}
    done = record.trained_epochs()
    out = {"epochs_done": len(done), "detail": ""}
    last = record.last_attempt()
    last_log = (last and last.log) or ""
    if not record.missing_evals(
        point["epochs"], point.get("test_prompts") or ["none"], point.get("base", False)
    ):
        return {**out, "state": "done"}
    if record.status == "failed":
        err = record.error or {}
        return {
            **out,
            "state": "failed",
            "detail": f"{err.get('type')}: {err.get('message')} (log: {err.get('log') or last_log})",
        }
    if record.status in ("running", "interrupted"):
        if run.is_locked():
            return {**out, "state": "running", "detail": f"log: {last_log}"}
        job_id = last and last.job_id
        if job_id in queued:
            return {
                **out,
                "state": "requeued",
                "detail": f"SLURM job {job_id} is queued again; it resumes after epoch "
                f"{max(done, default=0)}",
            }
        return {
            **out,
            "state": "interrupted",
            "detail": f"no process holds it; a rerun resumes after epoch {max(done, default=0)} (log: "
            f"{last_log})",
        }
    # a shorter run of the same signature finished; this one waits its turn
    return {**out, "state": "pending"}


def sweep_status(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per point in the manifest, plus any run records the manifest does not list."""
    points = plan.read_manifest(sweep_dir)
    listed = {p["run_dir"] for p in points}
    good, damaged = store.scan(sweep_dir)
    for e in damaged:
        if str(e.path.parent) not in listed:
            points.append(
                {
                    "num": None,
                    "overrides": [],
                    "run_dir": str(e.path.parent),
                    "setting": "?",
                    "prompt": "?",
                    "seed": None,
                    "epochs": 1,
                }
            )
    for rec in good:
        if rec["run_dir"] not in listed:  # e.g. a single run (no sweeper) that wrote into this dir
            points.append(
                {
                    "num": None,
                    "overrides": [],
                    "run_dir": rec["run_dir"],
                    "setting": rec["setting"],
                    "prompt": rec["prompt"],
                    "seed": rec["seed"],
                    "epochs": rec.get("target_epochs", 1),
                }
            )
    rows, queued = [], slurm_queue()
    for p in points:
        s = point_state(p, queued)
        rows.append(
            {
                "job": p["num"],
                "setting": p["setting"],
                "prompt": p["prompt"],
                "seed": p["seed"],
                "epochs": f"{min(s['epochs_done'], p['epochs'])}/{p['epochs']}",
                "state": s["state"],
                "run": Path(p["run_dir"]).name,
                "detail": s["detail"],
            }
        )
    return pd.DataFrame(rows)


def table(rows) -> str:
    return pd.DataFrame(rows).to_markdown(index=False)
