"""One sweep point, end to end: validate, skip if done, train epoch by epoch, evaluate, record."""

from __future__ import annotations

import logging
import platform
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ipsweep import elicit, evaluation, identity, lm, models, prompts, store
from ipsweep.plan import plan
from ipsweep.record import Attempt, Record
from ipsweep.settings.base import TrainExample, flawed_share, insert
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


def _attempt() -> Attempt:
    """This attempt: where it runs, with what, and where it logs (submitit's log, else Hydra's job log)."""
    import torch

    where = {"torch_threads": torch.get_num_threads(), "device": models.device_info()}
    try:
        import submitit

        env = submitit.JobEnvironment()
        where.update(job_id=env.job_id, log=str(env.paths.stdout))
    except (RuntimeError, KeyError):  # not a submitit job
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hydra = HydraConfig.get()
            where["log"] = str(Path(hydra.runtime.output_dir) / f"{hydra.job.name}.log")
    return Attempt.here(**where)


def _new_record(cfg, point) -> Record:
    prompt = point.run_prompt
    return Record(
        signature=point.signature,
        setting=cfg.setting.name,
        prompt=prompt.name,
        prompt_text=prompt.text,
        role=prompt.role,
        condition=prompt.condition,
        seed=cfg.train.seed,
        model=cfg.model.name,
        prompt_mode=prompt.mode,
        **({"paraphrases": prompt.bank} if prompt.bank else {}),  # else unset: records as before
        placement=prompt.placement,
        placement_override=prompt.placement if prompt.moved else None,
        sweep=cfg.name,
        behaviour_metric=point.setting.behaviour_metric,
        capability_metric=point.setting.capability_metric,
        config=identity.semantic_config(cfg, prompt, point.inputs),
        epochs={},
        status="new",
    )


def _existing_record(run_dir: store.Run) -> Record | None:
    try:
        return run_dir.load()
    except store.DamagedRecord as e:
        kept = run_dir.set_aside()
        log.warning("damaged run record (%s); kept as %s, the run starts again", e.reason, kept)
        return None


@contextmanager
def _recording(record: Record, run_dir: store.Run, tracker: Tracker):
    """The record's lifetime in a job: saved as running, then as done, interrupted or failed, whatever
    happens in between; the W&B run is finished each way."""
    run_dir.save(record)
    try:
        yield
    except (SystemExit, KeyboardInterrupt) as e:
        # preempted or timed out (submitit requeues, then exits), or Ctrl-C: a rerun resumes
        record.interrupt(e)
        run_dir.save(record)
        tracker.finish(exit_code=1)
        log.warning(
            "run %s is recorded as interrupted after epoch %s; to resume it, run the same command again "
            "(or let the scheduler requeue it)",
            run_dir.dir.name,
            max(record.trained_epochs(), default=0),
        )
        raise
    except BaseException as e:
        record.fail(e)
        run_dir.save(record)
        tracker.finish(exit_code=1)
        log.error("run %s failed: %s (record: %s)", run_dir.dir.name, e, run_dir.record_path)
        release(e)
        raise
    record.finish()
    run_dir.save(record)


def run(cfg) -> list[dict]:
    """Run (or reuse) one point; returns the headline rates per epoch. Raises after recording a failure."""
    point = plan(cfg)
    run_dir, epochs = point.run, cfg.train.epochs
    wanted = [t.name for t in point.test_prompts]

    with run_dir.lock():
        record = _existing_record(run_dir)
        if record and not record.missing_evals(epochs, wanted, cfg.eval.base):
            log.info(
                "skip: %s already has epochs 1..%d tested with %s (%s)",
                run_dir.dir.name,
                epochs,
                ", ".join(wanted),
                run_dir.record_path,
            )
            return record.headline_rates(epochs, point.headline)
        record = record or _new_record(cfg, point)
        record.start_attempt(
            _attempt(),
            {t.name: t.role for t in point.test_prompts},
            epochs,
            versions=_versions(),
            run_dir=str(run_dir.dir),
        )
        tracker = Tracker(
            cfg, signature=point.signature, prompt=point.run_prompt, run_dir=run_dir.dir, epochs=epochs
        )
        with _recording(record, run_dir, tracker):
            _Work(cfg, point, record, tracker)()
        result = record.headline_rates(epochs, point.headline)
        tracker.summary({"signature": point.signature, **{f"final/{k}": v for k, v in result[-1].items()}})
        tracker.finish()
        return result


def release(error: BaseException) -> None:
    """Free what a failed job held. Hydra keeps the exception in the sweep's JobReturn, and its traceback's
    frames hold the model, the trainer and their GPU memory: cleared, the next job of an in-process sweep
    starts with the memory the first had."""
    seen = set()
    while error is not None and id(error) not in seen:  # the exception and what it was raised from
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    models.free_accelerator()


class _Work:
    """A point's work on its record, as a recipe: load the base model once, evaluate it (epoch 0), elicit,
    fine-tune epoch by epoch with each epoch evaluated and recorded as it ends, finish the evaluations. When
    and how the evaluations are made is the evaluator's (ipsweep.evaluation: HF in the loop, vLLM after)."""

    def __init__(self, cfg, point, record: Record, tracker: Tracker):
        self.cfg, self.point, self.record, self.tracker = cfg, point, record, tracker
        self.setting, self.run_dir = point.setting, point.run
        # a setting that chooses among fixed replies reads first-token log-probs: no generation to hand off
        self.engine = "hf" if self.setting.choices else cfg.eval.engine
        if self.engine != cfg.eval.engine:
            log.warning(
                "setting %s chooses among fixed replies; HF scores them (eval.engine=hf)", cfg.setting.name
            )

    def __call__(self) -> None:
        from ipsweep.train import dataset, finetune

        cfg, record = self.cfg, self.record
        t0 = time.time()
        model, tokenizer = models.load(cfg.model)
        record.add_timing(model_load_s=time.time() - t0)
        # where generation ends a reply (lm.generate)
        record.stop_token_ids = stop = lm.stop_token_ids(model, tokenizer)
        # fails here, before any work
        rows, cut = dataset(
            tokenizer, self._training_examples(), cfg.train.max_length, cfg.train.max_cut_share
        )
        record.train_cut = cut.as_dict()
        ctx = evaluation.Context(
            cfg,
            self.point,
            record,
            self.tracker,
            tokenizer,
            stop,
            self.setting.eval_examples(cfg.eval.n_eval),
        )
        evaluator = evaluation.evaluator(self.engine, ctx)
        evaluator.before_training(model)
        self._elicit(ctx, model, [e for e in ctx.missing_estimators() if e not in evaluator.elicits])
        for e in sorted(record.epochs, key=int):  # epochs trained before but not yet on this W&B run
            ctx.log_once(int(e), record.epochs[e], {})
        evaluator.start()
        done = record.checkpoints()
        finetune(
            model, tokenizer, rows, cfg.train, self.run_dir.dir / "checkpoints", done, evaluator.epoch_end
        )
        del model  # training's memory is released before the evaluator finishes (vLLM takes the accelerator)
        models.free_accelerator()
        evaluator.finish()

    def _elicit(self, ctx, model, estimators: list[str]) -> None:
        """The elicitation estimates the record lacks (`estimators`), on the untrained model."""
        record = self.record
        if record.elicitation is None or estimators:
            record.elicitation = {
                **(record.elicitation or {}),
                **elicit.elicitation(
                    self.cfg,
                    self.setting,
                    model,
                    ctx.tokenizer,
                    ctx.examples,
                    self.point.run_prompt,
                    estimators,
                ),
            }
            ctx.save()
        ctx.log_elicitation()

    def _training_examples(self) -> list[TrainExample]:
        """The run's training chats, its training prompt inserted (a mixed run's draws recorded)."""
        cfg, setting = self.cfg, self.setting
        train, mix = flawed_share(
            setting,
            cfg.setting.name,
            setting.train_examples()[: cfg.train.n_train],
            cfg.setting.flawed_share,
            cfg.train.seed,
        )
        if mix["clean"]:  # else unset: records as before
            self.record.flawed = mix
        train_prompt = self.point.run_prompt.train_prompt
        if train_prompt:
            draws = prompts.draw(train_prompt, len(train), cfg.train.seed)
            texts = train_prompt.training_texts
            inserted = [replace(train_prompt, text=texts[i]) for i in draws]
        else:
            inserted = [None] * len(train)
        train = [
            TrainExample(insert(setting, ex.messages, p), ex.completion) for ex, p in zip(train, inserted)
        ]
        self.record.n_train = len(train)
        if train_prompt and train_prompt.mode == "mixed":  # which text each example had (from train.seed)
            self.record.prompt_draws = {"texts": list(texts), "per_example": draws}
        if train_prompt:  # counted from what was inserted: a "fixed" arm must show 1, a K-bank arm K
            self.record.prompt_texts_trained = len({p.text for p in inserted})
            if self.record.prompt_texts_trained < len(texts):
                log.warning(
                    "the %d training examples drew %d of the prompt's %d texts",
                    len(train),
                    self.record.prompt_texts_trained,
                    len(texts),
                )
        return train
