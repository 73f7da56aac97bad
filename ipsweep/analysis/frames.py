"""Run records to frames: one row per item outcome, per metric, per arm evaluation; the keys that match an
arm with its control (`match_key`) and an arm's seeds with each other (`design_key`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ipsweep import identity, prompts
from ipsweep.cache import digest
from ipsweep.config import ESTIMATORS
from ipsweep.errors import ConfigError

ARM_ORDER = {"control": 0, "ip": 1, "ptst": 2}


def arm_name(record: dict) -> str:
    """Display name of a run's condition: control, ip:<prompt>, with [mixed] for a paraphrase mix and
    @<placement> where the sweep moved the prompt from the library's placement."""
    return (
        "control"
        if record["condition"] == "control"
        else f"{record['condition']}:{record['prompt']}{variant(record)}"
    )


def variant(record: dict) -> str:
    """How an IP run's prompt was trained, when not as the library has it: [mixed] (paraphrase mix; [mixed K]
    from a bank of its first K texts), @<placement> (moved). Correlations are computed within a variant."""
    if record["condition"] != "ip":
        return ""
    bank = f" {record['paraphrases']}" if record.get("paraphrases") else ""
    mixed = f"[mixed{bank}]" if record.get("prompt_mode") == "mixed" else ""
    return mixed + (f"@{record['placement_override']}" if record.get("placement_override") else "")


# The research axes a design sits at (docs/axes.md): the same for an arm and its control.
AXES = ("flawed_share", "method", "lora_r", "lora_targets")


def axes(record: dict) -> dict:
    """A run's values of the research axes (AXES), read from its config; the defaults where the config
    predates an axis or leaves it out (train.lora of a full fine-tune)."""
    config = record["config"]
    train = config.get("train", {})
    lora = train.get("lora")
    return {
        "flawed_share": config.get("setting", {}).get("flawed_share", 1.0),
        "method": train.get("method", "lora"),
        "lora_r": lora["r"] if lora else None,
        "lora_targets": "+".join(lora["target_modules"]) if lora else None,
    }


def match_key(record: dict) -> str:
    """What an arm and its control share: the run's whole semantic config except the training prompt."""
    return digest(identity.without(record["config"], "prompt"))


def design_key(record: dict) -> str:
    """What the seeds of one arm share: the config except the training prompt and the seed."""
    return digest(identity.without(record["config"], "prompt", "train.seed"))


def headline_evaluations(record: dict) -> list[tuple[str, str, str, str, str]]:
    """(arm, condition, prompt, role, test prompt) for each arm this record measures: an IP run under the
    unmodified test prompt; a control under it (the control) and under each safety prompt it was tested
    with (PTST: the same trained model, the safety prompt inserted at test time)."""
    if record["condition"] != "control":
        return [(arm_name(record), record["condition"], record["prompt"], record["role"], prompts.NONE)]
    out = [("control", "control", prompts.NONE, "none", prompts.NONE)]
    for name, role in record.get("test_prompt_roles", {}).items():
        if role == "safety":
            out.append((f"ptst:{name}", "ptst", name, "safety", name))
    return out


def item_outcomes(records: list[dict]) -> pd.DataFrame:
    """One row per run x epoch x test prompt x metric x eval item: y = share of the item's samples that
    show the metric. Paired comparisons join on `item`."""
    rows = []
    for r in records:
        mk, dk = match_key(r), design_key(r)
        for epoch, entry in r["epochs"].items():
            for test_prompt, ev in entry["evals"].items():
                for it in ev.get("items", []):
                    for metric in (r["behaviour_metric"], r["capability_metric"]):
                        if metric not in it or not it[metric][1]:
                            continue
                        k, n = it[metric]
                        rows.append(
                            {
                                "setting": r["setting"],
                                "model": r["model"],
                                "design": dk,
                                "match": mk,
                                "run": Path(r["run_dir"]).name,
                                "condition": r["condition"],
                                "prompt": r["prompt"],
                                "seed": r["seed"],
                                "epoch": int(epoch),
                                "test_prompt": test_prompt,
                                "kind": "behaviour" if metric == r["behaviour_metric"] else "capability",
                                "metric": metric,
                                "item": it["id"],
                                "eval_set": it.get("eval_set"),
                                "group": it.get("group"),
                                "k": k,
                                "n": n,
                                "y": k / n,
                            }
                        )
    return pd.DataFrame(rows)


def metric_rows(records: list[dict]) -> pd.DataFrame:
    """One row per run x epoch x test prompt x metric, with counts (pooled Wilson CIs: per-evaluation
    only)."""
    rows = []
    for r in records:
        for epoch, entry in r["epochs"].items():
            for test_prompt, ev in entry["evals"].items():
                for metric, m in ev["metrics"].items():
                    rows.append(
                        {
                            "sweep": r.get("sweep"),
                            "setting": r["setting"],
                            "model": r["model"],
                            "arm": arm_name(r),
                            "condition": r["condition"],
                            "prompt": r["prompt"],
                            "role": r["role"],
                            "seed": r["seed"],
                            "signature": r["signature"],
                            "design": design_key(r),
                            "status": r["status"],
                            "epoch": int(epoch),
                            "test_prompt": test_prompt,
                            "metric": metric,
                            "kind": "behaviour"
                            if metric == r["behaviour_metric"]
                            else "capability"
                            if metric == r["capability_metric"]
                            else "other",
                            "loss": entry.get("loss"),
                            **m,
                        }
                    )
    return pd.DataFrame(rows)


def check_controls(records: list[dict]) -> None:
    """Each arm has at most one control with its identity; two are an error that names both runs."""
    seen: dict[str, str] = {}
    for r in records:
        if r["condition"] != "control":
            continue
        key = match_key(r)
        if key in seen and seen[key] != r["run_dir"]:
            raise ConfigError(
                f"two control runs match the same arms: {seen[key]} and {r['run_dir']} (same setting, model, "
                "seed and hyper-parameters); fix: analyse one of the sweeps that hold them, or remove the "
                "duplicate run"
            )
        seen[key] = r["run_dir"]


def by_evaluation(its: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """The items table split by evaluation: (run, epoch, test prompt, kind) -> its item rows."""
    return {key: g for key, g in its.groupby(["run", "epoch", "test_prompt", "kind"], sort=False)}


def outcomes(evals: dict[tuple, pd.DataFrame], ev, kind: str) -> pd.DataFrame | None:
    """The item rows of arm evaluation `ev` (a row of arm_evaluations) for `kind`, or None if not
    evaluated."""
    return evals.get((ev.run, ev.epoch, ev.test_prompt, kind))


def shared_items(evals: dict[tuple, pd.DataFrame], rows: pd.DataFrame, kind: str) -> pd.DataFrame | None:
    """The item rows of the evaluations in `rows` (arm_evaluations-shaped) for `kind`, kept to the items
    every one of them scored; None if none was evaluated."""
    parts = [p for ev in rows.itertuples() if (p := outcomes(evals, ev, kind)) is not None]
    if not parts:
        return None
    ids = set.intersection(*(set(p.item) for p in parts))
    part = pd.concat(parts)
    return part[part.item.isin(ids)]


def seeds_by_items(part: pd.DataFrame, item_ids) -> np.ndarray:
    """seeds x items matrix of y for the given items (rows: seeds in order)."""
    wide = part.pivot_table(index="seed", columns="item", values="y", aggfunc="mean")
    return wide.reindex(columns=list(item_ids)).to_numpy()


def recorded_elicitation(record: dict) -> dict:
    """A run's elicitation estimates by estimator. Before run signature v4, `logprob` was the non-contrastive
    estimator that is now called `logprob_train`: old records are read under that name."""
    el = dict(record.get("elicitation") or {})
    version = (record.get("config") or {}).get("signature_version", identity.SIGNATURE_VERSION)
    if version < 4 and "logprob" in el:
        el["logprob_train"] = el.pop("logprob")
    return el


def arm_evaluations(records: list[dict]) -> pd.DataFrame:
    """One row per (arm, seed, epoch): which run and test prompt measure it, and its control's run."""
    controls = {match_key(r): r for r in records if r["condition"] == "control"}
    rows = []
    for r in records:
        for a, cond, prompt, role, test_prompt in headline_evaluations(r):
            ctrl = controls.get(match_key(r))
            for epoch, entry in r["epochs"].items():
                if test_prompt not in entry["evals"] or not entry["evals"][test_prompt].get("items"):
                    continue
                # a paraphrase mix trains on many texts; the run's estimate is of its library text alone
                el = recorded_elicitation(r) if cond == "ip" and r.get("prompt_mode") != "mixed" else {}
                rows.append(
                    {
                        "setting": r["setting"],
                        "model": r["model"],
                        "design": design_key(r),
                        "arm": a,
                        "variant": variant(r),
                        "condition": cond,
                        "prompt": prompt,
                        "role": role,
                        "seed": r["seed"],
                        "epoch": int(epoch),
                        "run": Path(r["run_dir"]).name,
                        "test_prompt": test_prompt,
                        "control_run": Path(ctrl["run_dir"]).name if ctrl else None,
                        **{f"elicit_{e}": el.get(e, {}).get("estimate") for e in ESTIMATORS},
                        **axes(r),
                        # an IP run's paraphrase bank (train.paraphrases) and the distinct texts it trained on
                        "paraphrases": r.get("paraphrases"),
                        "texts_trained": r.get("prompt_texts_trained"),
                    }
                )
    return pd.DataFrame(rows)


def elicitation_table(records: list[dict]) -> pd.DataFrame:
    """One row per (setting, prompt): both estimators with their CIs, as recorded by the runs."""
    rows = {}
    for r in records:
        for est, v in recorded_elicitation(r).items():
            row = rows.setdefault(
                (r["setting"], r["prompt"], variant(r)),
                {
                    "setting": r["setting"],
                    "prompt": r["prompt"],
                    "variant": variant(r),
                    "role": r["role"],
                    "arm": arm_name(r),
                },
            )
            row.update({est: v["estimate"], f"{est}_lo": v["lo"], f"{est}_hi": v["hi"]})
    return pd.DataFrame(list(rows.values()))


def screened_elicitation(paths: list, records: list[dict]) -> pd.DataFrame:
    """Elicitation estimates from `ipsweep screen` tables (elicitation.csv) instead of the runs' records: a
    new estimator is tested against finished sweeps without retraining. Each table must be of the runs' model.
    """
    tables = []
    for path in paths:
        t = pd.read_csv(path)
        missing = {"setting", "model", "prompt", "role"} - set(t)
        if missing:
            raise ConfigError(
                f"{path} lacks column(s) {', '.join(sorted(missing))}; fix: pass an elicitation.csv "
                "written by `ipsweep screen`"
            )
        tables.append(t)
    screened = pd.concat(tables, ignore_index=True)
    runs = {(r["setting"], r["model"]) for r in records}
    for setting, model in sorted(runs):
        have = set(screened.model[screened.setting == setting])
        if have and model not in have:
            raise ConfigError(
                f"the screen of setting '{setting}' was made on model(s) {', '.join(sorted(have))}, the "
                "runs on "
                f"'{model}'; fix: screen with the runs' model (ipsweep screen setting={setting} model=...)"
            )
    return screened[screened.role != "safety"].assign(arm=lambda t: t.prompt)


def use_screened(arms: pd.DataFrame, screened: pd.DataFrame) -> pd.DataFrame:
    """The arms' elicitation columns read from the screen (IP-style arms only; NaN where a prompt was not
    screened)."""
    out = arms.copy()
    key = screened.set_index(["setting", "prompt"])
    for est in ESTIMATORS:
        values = key[est].to_dict() if est in key else {}
        out[f"elicit_{est}"] = [
            values.get((s, p), np.nan) if c == "ip" else None
            for s, p, c in zip(out.setting, out.prompt, out.condition)
        ]
    return out
