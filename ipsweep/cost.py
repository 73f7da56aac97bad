"""What a sweep will cost, shown by `--dry-run` before anything is launched.

The work is counted from the plan: trainings (points that share a run train once), epochs still to train
(a run's record may hold some), training examples x epochs, evaluations and the most new tokens they can
generate. Time comes only from measurement: the records of earlier runs of the same model, setting and device
kind (this sweep dir's and its sibling sweep dirs'), as seconds per training example-epoch and per evaluated
item x new-token budget. Where no such record exists the estimate says so rather than guess.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ipsweep import store


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _rates_of(record: dict) -> tuple[float | None, float | None]:
    """(seconds per training example-epoch, seconds per evaluated item x new-token budget) of one record."""
    epochs = [e for k, e in record.get("epochs", {}).items() if k != "0"]
    n_train = record.get("n_train")
    train = [e["train_s"] for e in epochs if e.get("train_s") is not None]
    per_example = sum(train) / (n_train * len(train)) if train and n_train else None
    budget = record.get("config", {}).get("eval", {}).get("max_new_tokens") or 1
    evals = [
        (
            e["eval_s"],
            sum(next(iter(v["metrics"].values()), {}).get("n", 0) for v in e.get("evals", {}).values()),
        )
        for e in epochs
        if e.get("eval_s") and e.get("evals")
    ]
    items = sum(n for _, n in evals)
    per_item = sum(s for s, _ in evals) / (items * budget) if items else None
    return per_example, per_item


def measured_rates(sweep_dir: Path) -> dict[tuple, dict]:
    """Per (model, setting, device kind): median rates over the finished runs of this sweep dir and its
    siblings, and how many runs they come from."""
    found: dict[tuple, list] = {}
    parent = Path(sweep_dir).parent
    for sweep in sorted(parent.iterdir()) if parent.is_dir() else []:
        for record in store.records(sweep):
            if record.get("status") == "done":
                device = record.get("config", {}).get("inputs", {}).get("device", "?")
                found.setdefault((record["model"], record["setting"], device), []).append(_rates_of(record))
    rates = {}
    for key, pairs in found.items():
        train = [t for t, _ in pairs if t is not None]
        evals = [e for _, e in pairs if e is not None]
        if train and evals:
            rates[key] = {
                "train": statistics.median(train),
                "eval": statistics.median(evals),
                "runs": len(pairs),
            }
    return rates


def trainings(points: list[dict], done_epochs: dict[str, int]) -> list[dict]:
    """The sweep's work per training (run folder): epochs to train, examples x epochs, evaluations, and the
    items x new-token budget they evaluate."""
    runs: dict[str, dict] = {}
    for p in points:
        c = p["config"]
        run = runs.setdefault(
            p["run_dir"],
            {
                "key": (c["model"]["name"], p["setting"], p["inputs"].get("device", "?")),
                "jobs": [],
                "epochs": 0,
                "test_prompts": set(),
                "n_train": p["n_train"],
                "n_eval": p["n_eval"] * c["eval"]["samples_per_prompt"],
                "budget": c["eval"]["max_new_tokens"],
            },
        )
        run["jobs"].append(p["num"])
        run["epochs"] = max(run["epochs"], p["epochs"])
        run["test_prompts"] |= set(p["test_prompts"])
    for run_dir, run in runs.items():
        new = max(run["epochs"] - done_epochs.get(run_dir, 0), 0)
        run["new_epochs"] = new
        run["example_epochs"] = run["n_train"] * new
        run["evaluations"] = len(run["test_prompts"]) * new
        run["item_tokens"] = run["evaluations"] * run["n_eval"] * run["budget"]
    return list(runs.values())


def estimate(points: list[dict], done_epochs: dict[str, int], rates: dict, limit_min: float | None) -> str:
    """The cost lines --dry-run prints (see the module docstring)."""
    runs = trainings(points, done_epochs)
    work = [r for r in runs if r["new_epochs"]]
    lines = [
        f"cost: {len(runs)} trainings ({len(runs) - len(work)} already trained), "
        f"{sum(r['new_epochs'] for r in work)} epochs to train ({sum(r['example_epochs'] for r in work):,} "
        f"training examples x epochs), {sum(r['evaluations'] for r in work):,} evaluations (at most "
        f"{sum(r['item_tokens'] for r in work):,} new tokens)"
    ]
    for key in sorted({r["key"] for r in work}):
        mine = [r for r in work if r["key"] == key]
        model, setting, device = key
        rate = rates.get(key)
        if rate is None:
            lines.append(
                f"  {model} on {setting} ({device}): no finished run to time it by, so no time estimate for "
                f"its {len(mine)} trainings; one finished point of it gives one"
            )
            continue
        seconds = [r["example_epochs"] * rate["train"] + r["item_tokens"] * rate["eval"] for r in mine]
        unit = "GPU" if device == "cuda" else device
        lines.append(
            f"  {model} on {setting} ({device}): ~{_duration(sum(seconds))} of {unit} time for {len(mine)} "
            f"trainings, the longest ~{_duration(max(seconds))} (timed by {rate['runs']} earlier runs of it)"
        )
        if limit_min:
            over = [(r, s) for r, s in zip(mine, seconds) if s > limit_min * 60]
            if over:
                r, s = max(over, key=lambda rs: rs[1])
                lines.append(
                    f"  warning: {len(over)} jobs would pass the SLURM time limit "
                    f"(hydra.launcher.timeout_min={limit_min:g}), e.g. job #{r['jobs'][0]} ~{_duration(s)}; "
                    "each is requeued at the limit and resumes after its last epoch, or raise the limit"
                )
    return "\n".join(lines)
