"""What a sweep will cost, shown by `--dry-run` before anything is launched.

The work is counted from the plan: trainings (points that share a run train once), epochs still to train
(a run's record may hold some), training examples x epochs, evaluations and the most new tokens they can
generate. Time comes only from measurement: the records of earlier runs of the same model, setting and device
kind (this sweep dir's and its sibling sweep dirs'), as seconds per training example-epoch and per evaluated
item x new-token budget. Where no such record exists, a rule gives the time, labelled as a rule: FLOPs from
the model's parameter count (its safetensors headers) and the setting's training rows tokenized as the job
tokenizes them, at the effective rates of RULE below; a measurement replaces it once one point has finished.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from ipsweep import models, store
from ipsweep.errors import ConfigError

# The rule's effective rates per device kind. cpu: fitted to this repo's committed CPU sweeps (docs/results:
# SmolLM2-135M fp32 LoRA on 2 shared cores); summed over each sweep the rule gives 0.78-1.70x the seconds
# its records hold (single runs vary more with the machine's load), checked by tests/test_cost.py. cuda: not
# measured here: HF+PEFT LoRA SFT of an 8B model on an A100 at 2,392 tokens/s (LLaMA-Factory's published
# comparison), i.e. 4·N FLOPs per token at 77 TFLOP/s; decoding reads the weights once per step at 1.5 TB/s
# (75% of an A100's 2 TB/s). A training token costs 4·N FLOPs with a frozen base (forward and the input
# gradients), 6·N with gradient checkpointing (a second forward); a generated token 2·N, or the weights'
# bytes over the batch where reading them takes longer (a roofline). Prompt tokens at test time are not
# counted, and every reply is taken to run to eval.max_new_tokens.
RULE = {
    "cpu": {"train": 7.7e10, "decode": 3.0e10, "bandwidth": 1e10, "basis": "rates fitted to 2 CPU cores"},
    "cuda": {
        "train": 7.7e13,
        "decode": 7.7e13,
        "bandwidth": 1.5e12,
        "basis": "rates of an A100-class GPU",
    },
}


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
    eval_cfg = record.get("config", {}).get("eval", {})
    budget, samples = eval_cfg.get("max_new_tokens") or 1, eval_cfg.get("samples_per_prompt") or 1
    # every item generated for (a metric's n counts only the items it applies to)
    evals = [
        (e["eval_s"], sum(len(v.get("items", [])) * samples for v in e["evals"].values()))
        for e in epochs
        if e.get("eval_s") and e.get("evals")
    ]
    items = sum(n for _, n in evals)
    per_item = sum(s for s, _ in evals) / (items * budget) if items else None
    return per_example, per_item


def measured_rates(sweep_dir: Path) -> dict[tuple, dict]:
    """Per (model, setting, device kind, train.method): median rates over the finished runs of this sweep dir
    and its siblings, and how many runs they come from."""
    found: dict[tuple, list] = {}
    parent = Path(sweep_dir).parent
    for sweep in sorted(parent.iterdir()) if parent.is_dir() else []:
        for record in store.records(sweep):
            if record.get("status") == "done":
                config = record.get("config", {})
                device = config.get("inputs", {}).get("device", "?")
                method = config.get("train", {}).get("method", "lora")
                key = (record["model"], record["setting"], device, method)
                found.setdefault(key, []).append(_rates_of(record))
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


def model_parameters(model_cfg: dict) -> tuple[int, Path] | None:
    """(parameter count, folder) from the safetensors headers of the model's folder (nothing is loaded);
    None where no local folder holds them (a plain loader function, a hub id not in the cache)."""
    from safetensors import safe_open

    local = models.local_folder(OmegaConf.create(model_cfg))
    if local is None:
        return None
    files = sorted(local.glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for file in files:
        with safe_open(file, framework="pt") as weights:
            n += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    return n, local


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: str):
    # tokenizer.json: the same tokens as the model's class gives, at a third of the import
    if (Path(folder) / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast as Tokenizer
    else:
        from transformers import AutoTokenizer as Tokenizer
    return Tokenizer.from_pretrained(folder)


@functools.lru_cache(maxsize=32)
def _setting_rows(folder: str, setting_json: str, n_train: int | None, max_length: int, flawed: tuple | None):
    """The setting's first n_train training examples (all: None), with setting.flawed_share's clean replies
    where `flawed` = (share, seed), and each one's (tokens, labelled tokens) as the job tokenizes it at
    max_length, before a prompt is inserted."""
    from ipsweep.lm import IGNORE, tokenize
    from ipsweep.settings.base import build, flawed_share

    setting_cfg = OmegaConf.create(json.loads(setting_json))
    setting = build(setting_cfg)
    examples = setting.train_examples()[:n_train]
    if flawed:
        examples, _ = flawed_share(setting, setting_cfg.name, examples, *flawed)
    tokenizer = _tokenizer(folder)
    counts = []
    for e in examples:
        row = tokenize(tokenizer, e.messages, e.completion, max_length)
        counts.append((len(row["input_ids"]), sum(label != IGNORE for label in row["labels"])))
    return setting, tokenizer, examples, tuple(counts)


def training_rows(
    folder: Path,
    setting_cfg: dict,
    n_train: int | None,
    max_length: int,
    flawed: tuple | None = None,
    prompt=None,
    longest: int = 16,
) -> tuple[tuple[int, int], ...]:
    """(tokens, labelled tokens) of each training row as the job tokenizes it (lm.tokenize at max_length):
    the setting's first n_train examples (all: None), setting.flawed_share's clean replies where `flawed` =
    (share, seed). Tokenized once per setting and length (the rule here and the memory estimate read the
    same rows). With `prompt` (a prompts.Prompt), its longest training text is inserted into the `longest`
    longest rows, which are tokenized again: inserting one text adds about as many tokens to every row, so
    the longest row with it is one of them; the other rows keep their length without it."""
    setting, tokenizer, examples, counts = _setting_rows(
        str(folder), json.dumps(setting_cfg, sort_keys=True), n_train, max_length, flawed
    )
    if prompt is None or not counts:
        return counts
    from dataclasses import replace

    from ipsweep.lm import IGNORE, tokenize
    from ipsweep.settings.base import insert

    prompt = replace(prompt, text=max(prompt.training_texts, key=len))
    out = list(counts)
    for i in sorted(range(len(counts)), key=lambda i: -counts[i][0])[:longest]:
        row = tokenize(
            tokenizer, insert(setting, examples[i].messages, prompt), examples[i].completion, max_length
        )
        out[i] = (len(row["input_ids"]), sum(label != IGNORE for label in row["labels"]))
    return tuple(out)


def tokens_per_example(folder: Path, setting_cfg: dict, n_train: int, max_length: int) -> float:
    """Mean tokens of the setting's training rows (the first 64 of them) as the job tokenizes them, before a
    prompt is inserted."""
    rows = training_rows(folder, setting_cfg, n_train, max_length)[:64]
    return statistics.mean(tokens for tokens, _ in rows)


def rule_seconds(runs: list[dict], device: str) -> tuple[list[float], str] | None:
    """Each training's seconds by the rule (see RULE), and what the rule assumed; None where it has no rate
    for the device or no parameter count for the model."""
    rates = RULE.get(device)
    try:
        size = model_parameters(runs[0]["model_cfg"]) if rates else None
        if size is None:
            return None
        n, folder = size
        tokens: dict[str, float] = {}  # per distinct (setting, n_train, max_length)
        per_run = []
        for r in runs:
            rows = json.dumps([r["setting_cfg"], r["n_train"], r["max_length"]], sort_keys=True)
            if rows not in tokens:
                tokens[rows] = tokens_per_example(folder, r["setting_cfg"], r["n_train"], r["max_length"])
            per_run.append(tokens[rows])
    except (OSError, ValueError, KeyError, ConfigError):  # an estimate: it must not stop the dry run
        return None
    seconds = []
    for r, per_example in zip(runs, per_run):
        # FLOPs per token and parameter: forward 2, backward 2 (+2 for every weight's gradient in a full
        # fine-tune, +2 to recompute the forward with gradient checkpointing)
        flops = 4 + 2 * r.get("full", False) + 2 * r["checkpointing"]
        train = r["example_epochs"] * per_example * flops * n / rates["train"]
        decode = max(2 * n / rates["decode"], n * r["bytes"] / (rates["bandwidth"] * r["batch"]))
        seconds.append(train + r["item_tokens"] * decode)
    basis = (
        f"a rule, not a measurement: {n / 1e6:,.1f}M parameters, ~{statistics.mean(tokens.values()):.0f} "
        f"tokens per training example, every reply as long as eval.max_new_tokens, "
        f"{rates['basis']} (ipsweep/cost.py RULE); one finished point of it gives a measured estimate"
    )
    return seconds, basis


def trainings(points: list[dict], done_epochs: dict[str, int]) -> list[dict]:
    """The sweep's work per training (run folder): epochs to train, examples x epochs, evaluations, and the
    items x new-token budget they evaluate."""
    runs: dict[str, dict] = {}
    for p in points:
        c = p["config"]
        run = runs.setdefault(
            p["run_dir"],
            {
                "key": (
                    c["model"]["name"],
                    p["setting"],
                    p["inputs"].get("device", "?"),
                    c["train"].get("method", "lora"),
                ),
                "jobs": [],
                "epochs": 0,
                "test_prompts": set(),
                "n_train": p["n_train"],
                "n_eval": p["n_eval"] * c["eval"]["samples_per_prompt"],
                "budget": c["eval"]["max_new_tokens"],
                # what the rule needs where no earlier run measured this model and setting
                "model_cfg": c["model"],
                "setting_cfg": c["setting"],
                "max_length": c["train"]["max_length"],
                "checkpointing": bool(c["train"].get("gradient_checkpointing")),
                "full": c["train"].get("method") == "full",
                "batch": c["eval"]["batch_size"],
                "bytes": 4 if p["inputs"].get("dtype") == "fp32" else 2,
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
        model, setting, device, method = key
        where = f"{device}, full fine-tune" if method == "full" else device
        rate = rates.get(key)
        if rate is not None:
            seconds = [r["example_epochs"] * rate["train"] + r["item_tokens"] * rate["eval"] for r in mine]
            basis = f"timed by {rate['runs']} earlier runs of it"
        else:
            ruled = rule_seconds(mine, device)
            if ruled is None:
                lines.append(
                    f"  {model} on {setting} ({where}): no finished run to time it by and no rule for it "
                    f"(no parameter count, or no rate for {device}), so no time estimate for its "
                    f"{len(mine)} trainings; one finished point of it gives one"
                )
                continue
            seconds, basis = ruled
        unit = "GPU" if device == "cuda" else device
        lines.append(
            f"  {model} on {setting} ({where}): ~{_duration(sum(seconds))} of {unit} time for {len(mine)} "
            f"trainings, the longest ~{_duration(max(seconds))} ({basis})"
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
