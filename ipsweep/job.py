"""One sweep point, end to end: validate, skip if done, train epoch by epoch, evaluate, record."""

from __future__ import annotations

import logging
import os
import platform
import time
import traceback
from dataclasses import replace
from pathlib import Path

from ipsweep import elicit, lm, models, prompts, store
from ipsweep.evaluate import evaluate
from ipsweep.plan import plan
from ipsweep.settings.base import TrainExample, insert
from ipsweep.tracking import Tracker

log = logging.getLogger(__name__)


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        **store.code_version(),
    }


def _summary(eval_result: dict) -> dict:
    return {
        "metrics": eval_result["metrics"],
        "by_group": eval_result["by_group"],
        "items": eval_result["items"],
    }


def _attempt() -> dict:
    """Where this attempt runs and logs: a requeued or rerun job adds one more to the record."""
    import torch

    out = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "start_s": round(time.time(), 3),
        "host": platform.node(),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch_threads": torch.get_num_threads(),
        "device": models.device_info(),
    }
    try:
        import submitit

        env = submitit.JobEnvironment()
        out.update(job_id=env.job_id, log=str(env.paths.stdout))
    except (RuntimeError, KeyError):  # not a submitit job: Hydra's job log
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            out["log"] = str(Path(HydraConfig.get().runtime.output_dir) / f"{HydraConfig.get().job.name}.log")
    return out


def run(cfg) -> list[dict]:
    """Run (or reuse) one point; returns the headline rates per epoch. Raises after recording a failure."""
    point = plan(cfg)
    prompt, run_dir, signature, epochs = point.run_prompt, point.run, point.signature, cfg.train.epochs
    wanted = [tp.name for tp in point.test_prompts]

    with run_dir.lock():
        try:
            record = run_dir.load()
        except store.DamagedRecord as e:
            kept = run_dir.set_aside()
            log.warning("damaged run record (%s); kept as %s, the run starts again", e.reason, kept)
            record = None
        if record and not store.missing_evals(record, epochs, wanted, cfg.eval.base):
            log.info(
                "skip: %s already has epochs 1..%d tested with %s (%s)",
                run_dir.dir.name,
                epochs,
                ", ".join(wanted),
                run_dir.record_path,
            )
            return headline_rates(record, epochs, point.headline)
        record = record or {
            "signature": signature,
            "setting": cfg.setting.name,
            "prompt": prompt.name,
            "prompt_text": prompt.text,
            "role": prompt.role,
            "condition": prompt.condition,
            "seed": cfg.train.seed,
            "model": cfg.model.name,
            "prompt_mode": prompt.mode,
            "placement": prompt.placement,
            "placement_override": prompt.placement if prompt.moved else None,
            "sweep": cfg.name,
            "behaviour_metric": point.setting.behaviour_metric,
            "capability_metric": point.setting.capability_metric,
            "config": store.semantic_config(cfg, prompt, point.inputs),
            "epochs": {},
        }
        attempt = {
            **_attempt(),
            "resumed_from_epoch": max((int(k) for k in record["epochs"] if k != "0"), default=0),
        }
        record.setdefault("attempts", []).append(attempt)
        # roles of the test prompts evaluated: a control tested with a safety prompt is the PTST arm
        record.setdefault("test_prompt_roles", {}).update({tp.name: tp.role for tp in point.test_prompts})
        record.update(
            status="running",
            error=None,
            target_epochs=max(epochs, record.get("target_epochs", 0)),
            versions=_versions(),
            run_dir=str(run_dir.dir),
        )
        run_dir.save(record)
        tracker = Tracker(cfg, signature=signature, prompt=prompt, run_dir=run_dir.dir, epochs=epochs)
        try:
            _train_and_evaluate(cfg, point.setting, prompt, point.test_prompts, record, run_dir, tracker)
        except (SystemExit, KeyboardInterrupt) as e:
            # Preempted or timed out (submitit requeues, then exits), or Ctrl-C: not a failure; a rerun
            # resumes.
            record.update(
                status="interrupted",
                error={"type": type(e).__name__, "message": "interrupted", "log": attempt.get("log")},
            )
            run_dir.save(record)
            tracker.finish(exit_code=1)
            log.warning(
                "run %s is recorded as interrupted after epoch %s; to resume it, run the same command again "
                "(or let the scheduler requeue it)",
                run_dir.dir.name,
                max((int(k) for k in record["epochs"]), default=0),
            )
            raise
        except BaseException as e:
            record.update(
                status="failed",
                error={
                    "type": type(e).__name__,
                    "message": str(e),
                    "traceback": traceback.format_exc(limit=20),
                    "log": attempt.get("log"),
                },
            )
            run_dir.save(record)
            tracker.finish(exit_code=1)
            log.error("run %s failed: %s (record: %s)", run_dir.dir.name, e, run_dir.record_path)
            release(e)
            raise
        record["status"] = "done"
        attempt["end_s"] = round(time.time(), 3)
        run_dir.save(record)
        result = headline_rates(record, epochs, point.headline)
        tracker.summary({"signature": signature, **{f"final/{k}": v for k, v in result[-1].items()}})
        tracker.finish()
        return result


def release(error: BaseException) -> None:
    """Free what a failed job held. Hydra keeps the exception in the sweep's JobReturn, and its traceback's
    frames
    hold the model, the trainer and their GPU memory: cleared, the next job of an in-process sweep starts with
    the
    memory the first had."""
    import gc

    seen = set()
    while error is not None and id(error) not in seen:  # the exception and what it was raised from
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_and_evaluate(cfg, setting, prompt, test_prompts, record, run_dir, tracker) -> None:
    from ipsweep.train import dataset, finetune

    t0 = time.time()
    model, tokenizer = models.load(cfg.model)
    record.setdefault("timings", {})["model_load_s"] = round(time.time() - t0, 3)
    # where generation ends a reply (lm.generate)
    record["stop_token_ids"] = lm.stop_token_ids(model, tokenizer)
    train = _training_examples(cfg, setting, prompt, record)
    # fails here, before any work
    rows, cut = dataset(tokenizer, train, cfg.train.max_length, cfg.train.max_cut_share)
    record["train_cut"] = cut.as_dict()
    examples = setting.eval_examples(cfg.eval.n_eval)
    missing = store.missing_evals(record, cfg.train.epochs, [tp.name for tp in test_prompts], cfg.eval.base)
    if 0 in missing:
        evals = record["epochs"].setdefault("0", {"evals": {}})["evals"]
        for tp in [tp for tp in test_prompts if tp.name in missing[0]]:
            result = elicit.base_eval(cfg, setting, model, tokenizer, examples, tp)
            run_dir.write_samples(0, tp.name, result["samples"])
            evals[tp.name] = _summary(result)
        run_dir.save(record)
    for epoch in sorted(e for e in missing if e > 0 and str(e) in record["epochs"]):
        _evaluate_checkpoint(
            cfg,
            setting,
            tokenizer,
            examples,
            record,
            run_dir,
            epoch,
            [tp for tp in test_prompts if tp.name in missing[epoch]],
        )
    if "elicitation" not in record:
        record["elicitation"] = elicit.elicitation(cfg, setting, model, tokenizer, examples, prompt)
        run_dir.save(record)
    if "elicitation" in record:
        tracker.summary(
            {
                f"elicitation/{est}/{k}": v[k]
                for est, v in record["elicitation"].items()
                for k in ("estimate", "lo", "hi")
                if k in v
            }
        )
    for k in sorted(record["epochs"], key=int):  # epochs trained before but not yet on this W&B run
        _log_once(tracker, record, int(k), record["epochs"][k], {})

    epoch_start = time.time()

    def on_epoch_end(ep, model) -> None:
        nonlocal epoch_start
        train_s = time.time() - epoch_start
        t = time.time()
        evals, samples = {}, {}
        for tp in test_prompts:
            result = evaluate(model, tokenizer, setting, examples, tp, cfg.eval)
            run_dir.write_samples(ep.epoch, tp.name, result["samples"])
            evals[tp.name], samples[tp.name] = _summary(result), result["samples"]
        entry = {
            "loss": ep.loss,
            "steps": ep.steps,
            "losses": ep.losses,
            "checkpoint": ep.checkpoint,
            "train_s": round(train_s, 2),
            "eval_s": round(time.time() - t, 2),
            "evals": evals,
        }
        record["epochs"][str(ep.epoch)] = entry
        run_dir.save(record)
        _log_once(tracker, record, ep.epoch, entry, samples)
        log.info(
            "epoch %d: loss %.3f, %s",
            ep.epoch,
            ep.loss,
            ", ".join(
                f"{m}={r['rate']:.2f}"
                for m, r in evals[prompts.NONE]["metrics"].items()
                if r["rate"] is not None
            ),
        )
        epoch_start = time.time()

    done = {int(k): v["checkpoint"] for k, v in record["epochs"].items() if k != "0"}
    finetune(model, tokenizer, rows, cfg.train, run_dir.dir / "checkpoints", done, on_epoch_end)


def _training_examples(cfg, setting, prompt, record) -> list[TrainExample]:
    """The run's training chats, its training prompt inserted (a mixed run's draws recorded)."""
    train = setting.train_examples()[: cfg.train.n_train]
    tp = prompt.train_prompt
    draws = prompts.draw(tp, len(train), cfg.train.seed) if tp else [0] * len(train)
    texts = tp.training_texts if tp else ("",)
    train = [
        TrainExample(insert(setting, ex.messages, tp and replace(tp, text=texts[i])), ex.completion)
        for ex, i in zip(train, draws)
    ]
    record["n_train"] = len(train)
    if tp and tp.mode == "mixed":  # which text each example was trained with (reproducible from train.seed)
        record["prompt_draws"] = {"texts": list(texts), "per_example": draws}
    return train


def _log_once(tracker, record: dict, epoch: int, entry: dict, samples: dict) -> None:
    """Log an epoch to the run's W&B run unless it already was (a resumed or extended run logs only new
    epochs)."""
    logged = record.setdefault("wandb_logged_epochs", [])
    if epoch in logged or tracker.run is None:
        return
    first_step = sum(
        record["epochs"][str(e)].get("steps", 0) for e in range(1, epoch) if str(e) in record["epochs"]
    )
    tracker.log_epoch(epoch, entry, samples, first_step)
    logged.append(epoch)


def _evaluate_checkpoint(
    cfg, setting, tokenizer, examples, record, run_dir, epoch: int, test_prompts
) -> None:
    """Add evaluations under `test_prompts` to an epoch trained earlier (e.g. a PTST point that reuses the
    control's run): its saved adapter on a fresh copy of the base model, so training state is untouched."""
    from peft import PeftModel

    base, _ = models.load(cfg.model)
    model = PeftModel.from_pretrained(base, record["epochs"][str(epoch)]["checkpoint"])
    for tp in test_prompts:
        result = evaluate(model, tokenizer, setting, examples, tp, cfg.eval)
        run_dir.write_samples(epoch, tp.name, result["samples"])
        record["epochs"][str(epoch)]["evals"][tp.name] = _summary(result)
    run_dir.save(record)
    del model, base


def headline_rates(record: dict, epochs: int, headline: str) -> list[dict]:
    """Behaviour and capability rate at each epoch 1..epochs under the point's headline test prompt."""
    out = []
    for e in range(1, epochs + 1):
        metrics = record["epochs"][str(e)]["evals"][headline]["metrics"]
        out.append(
            {
                "epoch": e,
                "behaviour": metrics[record["behaviour_metric"]]["rate"],
                "capability": metrics[record["capability_metric"]]["rate"],
            }
        )
    return out
