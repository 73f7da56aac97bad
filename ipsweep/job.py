"""One sweep point, end to end: validate, skip if done, train epoch by epoch, evaluate, record."""

from __future__ import annotations

import logging
import platform
import time
import traceback
from pathlib import Path

from ipsweep import elicit, models, prompts, store
from ipsweep.evaluate import evaluate
from ipsweep.settings.base import TrainExample, build
from ipsweep.tracking import Tracker

log = logging.getLogger(__name__)


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _summary(eval_result: dict) -> dict:
    return {"metrics": eval_result["metrics"], "by_group": eval_result["by_group"]}


def run(cfg) -> list[dict]:
    """Run (or reuse) one point; returns the headline rates per epoch. Raises after recording a failure."""
    prompt = prompts.resolve(cfg.setting, cfg.prompt)
    extra = [prompts.resolve(cfg.setting, n) for n in cfg.eval.extra_test_prompts]
    if cfg.eval.test_grid:
        own = [prompt] if prompt.condition == "ip" else []
        extra += own + [p for p in prompts.library(cfg.setting).values() if p.role == "safety"]
    setting = build(cfg.setting)  # reads and checks the data before any model is loaded
    test_prompts = list({p.name: p for p in [prompts.NO_PROMPT, *filter(None, [prompt.test_prompt]), *extra]}.values())
    headline = (prompt.test_prompt or prompts.NO_PROMPT).name
    epochs = cfg.train.epochs
    signature = store.digest(store.semantic_config(cfg, prompt, extra))
    run_dir = store.Run(Path(cfg.store_dir) / "runs" / f"{cfg.setting.name}-{prompt.name}-s{cfg.train.seed}-{signature}")

    with run_dir.lock():
        record = run_dir.load()
        if record and all(str(e) in record["epochs"] for e in range(1, epochs + 1)):
            log.info("skip: %s already has epochs 1..%d (%s)", run_dir.dir.name, epochs, run_dir.record_path)
            return headline_rates(record, epochs)
        record = record or {
            "signature": signature, "setting": cfg.setting.name, "prompt": prompt.name, "prompt_text": prompt.text,
            "role": prompt.role, "condition": prompt.condition, "seed": cfg.train.seed, "model": cfg.model.name,
            "sweep": cfg.name, "headline_test_prompt": headline,
            "behaviour_metric": setting.behaviour_metric, "capability_metric": setting.capability_metric,
            "config": store.semantic_config(cfg, prompt, extra), "epochs": {},
        }
        record.update(status="running", error=None, target_epochs=max(epochs, record.get("target_epochs", 0)),
                      versions=_versions(), run_dir=str(run_dir.dir))
        run_dir.save(record)
        tracker = Tracker(cfg, signature=signature, prompt=prompt, run_dir=run_dir.dir, epochs=epochs)
        try:
            _train_and_evaluate(cfg, setting, prompt, test_prompts, record, run_dir, tracker)
        except BaseException as e:
            record.update(status="failed", error={"type": type(e).__name__, "message": str(e),
                                                   "traceback": traceback.format_exc(limit=20)})
            run_dir.save(record)
            tracker.finish(exit_code=1)
            log.error("run %s failed: %s (record: %s)", run_dir.dir.name, e, run_dir.record_path)
            raise
        record["status"] = "done"
        run_dir.save(record)
        result = headline_rates(record, epochs)
        tracker.summary({"signature": signature, **{f"final/{k}": v for k, v in result[-1].items()}})
        tracker.finish()
        return result


def _train_and_evaluate(cfg, setting, prompt, test_prompts, record, run_dir, tracker) -> None:
    from ipsweep.train import finetune

    t0 = time.time()
    model, tokenizer = models.load(cfg.model)
    record.setdefault("timings", {})["model_load_s"] = round(time.time() - t0, 3)
    examples = setting.eval_examples(cfg.eval.n_eval)
    if cfg.eval.base and "0" not in record["epochs"]:
        evals = {}
        for tp in test_prompts:
            result = elicit.base_eval(cfg, setting, model, tokenizer, examples, tp)
            run_dir.write_samples(0, tp.name, result["samples"])
            evals[tp.name] = _summary(result)
        record["epochs"]["0"] = {"evals": evals}
        run_dir.save(record)
    if "elicitation" not in record:
        record["elicitation"] = elicit.elicitation(cfg, setting, model, tokenizer, examples, prompt)
        run_dir.save(record)
    for k in sorted(record["epochs"], key=int):  # the dashboard shows the whole curve, reused epochs too
        tracker.log_epoch(int(k), record["epochs"][k], {})

    train = setting.train_examples()[: cfg.train.n_train]
    train = [TrainExample(prompts.insert(ex.messages, prompt.train_prompt, cfg.setting.joiner), ex.completion) for ex in train]
    record["n_train"] = len(train)
    epoch_start = time.time()

    def on_epoch_end(ep, model) -> None:
        nonlocal epoch_start
        train_s = time.time() - epoch_start
        t = time.time()
        evals, samples = {}, {}
        for tp in test_prompts:
            result = evaluate(model, tokenizer, setting, examples, tp, cfg.eval, cfg.setting.joiner)
            run_dir.write_samples(ep.epoch, tp.name, result["samples"])
            evals[tp.name], samples[tp.name] = _summary(result), result["samples"]
        entry = {"loss": ep.loss, "steps": ep.steps, "losses": ep.losses, "checkpoint": ep.checkpoint,
                 "train_s": round(train_s, 2), "eval_s": round(time.time() - t, 2), "evals": evals}
        record["epochs"][str(ep.epoch)] = entry
        run_dir.save(record)
        tracker.log_epoch(ep.epoch, entry, samples)
        log.info("epoch %d: loss %.3f, %s", ep.epoch, ep.loss,
                 ", ".join(f"{m}={r['rate']:.2f}" for m, r in evals[record["headline_test_prompt"]]["metrics"].items()
                           if r["rate"] is not None))
        epoch_start = time.time()

    done = {int(k): v["checkpoint"] for k, v in record["epochs"].items() if k != "0"}
    finetune(model, tokenizer, train, cfg.train, run_dir.dir / "checkpoints", done, on_epoch_end)


def headline_rates(record: dict, epochs: int) -> list[dict]:
    """Behaviour and capability rate at each epoch 1..epochs under the headline test prompt."""
    out = []
    for e in range(1, epochs + 1):
        metrics = record["epochs"][str(e)]["evals"][record["headline_test_prompt"]]["metrics"]
        out.append({"epoch": e, "behaviour": metrics[record["behaviour_metric"]]["rate"],
                    "capability": metrics[record["capability_metric"]]["rate"]})
    return out
