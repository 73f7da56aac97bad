"""One sweep point, end to end: validate, skip if done, train epoch by epoch, evaluate, record."""

from __future__ import annotations

import logging
import platform
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ipsweep import elicit, engine, identity, lm, models, prompts, store
from ipsweep.evaluate import chats_for, evaluate, protocol, score
from ipsweep.plan import plan
from ipsweep.record import Attempt, Epoch, Evaluation, Record
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


class _Work:
    """A point's work on its record: the base model loaded once and evaluated (epoch 0, elicitation),
    then fine-tuned epoch by epoch, each epoch evaluated under every test prompt and saved as it ends."""

    def __init__(self, cfg, point, record: Record, tracker: Tracker):
        self.cfg, self.point, self.record, self.tracker = cfg, point, record, tracker
        self.setting, self.run_dir = point.setting, point.run
        self.examples = self.setting.eval_examples(cfg.eval.n_eval)
        self.epoch_start = time.time()
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
        self.tokenizer = tokenizer
        # where generation ends a reply (lm.generate)
        record.stop_token_ids = self.stop = lm.stop_token_ids(model, tokenizer)
        # fails here, before any work
        rows, cut = dataset(
            tokenizer, self._training_examples(), cfg.train.max_length, cfg.train.max_cut_share
        )
        record.train_cut = cut.as_dict()
        if self.engine == "hf":
            self._evaluate_missing(model)
        # with vLLM, the sampled estimator's generations join the engine's pass after training
        now = [e for e in self._missing_estimators() if not (self.engine == "vllm" and e == "sampled")]
        if record.elicitation is None or now:
            record.elicitation = {
                **(record.elicitation or {}),
                **elicit.elicitation(
                    cfg, self.setting, model, tokenizer, self.examples, self.point.run_prompt, now
                ),
            }
            self.run_dir.save(record)
        self._log_elicitation()
        for e in sorted(record.epochs, key=int):  # epochs trained before but not yet on this W&B run
            self._log_once(int(e), record.epochs[e], {})
        self.epoch_start = time.time()
        done = record.checkpoints()
        finetune(
            model, tokenizer, rows, cfg.train, self.run_dir.dir / "checkpoints", done, self._on_epoch_end
        )
        if self.engine == "vllm":
            folder = engine.model_folder(cfg, self.run_dir.dir / "engine" / "model")
            del model  # training's memory is released before the engine takes the accelerator
            release(None)
            self._evaluate_with_engine(folder)

    def _missing_estimators(self) -> list[str]:
        return [e for e in self.cfg.elicit.estimators if e not in (self.record.elicitation or {})]

    def _log_elicitation(self) -> None:
        self.tracker.summary(
            {
                f"elicitation/{est}/{k}": v[k]
                for est, v in self.record.elicitation.items()
                for k in ("estimate", "lo", "hi")
                if k in v
            }
        )

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

    def _evaluate_missing(self, model) -> None:
        """Evaluations the record lacks for epochs it has: epoch 0 on the base model, trained epochs on
        their saved adapters (e.g. a PTST point that reuses the control's run)."""
        cfg, record = self.cfg, self.record
        missing = record.missing_evals(
            cfg.train.epochs, [t.name for t in self.point.test_prompts], cfg.eval.base
        )
        if 0 in missing:
            for test_prompt in self._test_prompts(missing[0]):
                result = elicit.base_eval(
                    cfg, self.setting, model, self.tokenizer, self.examples, test_prompt
                )
                self._keep(0, test_prompt.name, {**result, "protocol": self._protocol("hf")})
            self.run_dir.save(record)
        for epoch in sorted(e for e in missing if e > 0 and str(e) in record.epochs):
            self._evaluate_checkpoint(model, epoch, self._test_prompts(missing[epoch]))

    def _test_prompts(self, names: list[str]) -> list:
        return [t for t in self.point.test_prompts if t.name in names]

    def _evaluate(self, model, test_prompt, adapter: str, step: int) -> dict:
        result = evaluate(model, self.tokenizer, self.setting, self.examples, test_prompt, self.cfg.eval)
        return {**result, "protocol": self._protocol("hf", adapter=adapter, step=step)}

    def _protocol(
        self, engine_name: str, version: str | None = None, adapter=None, step: int = 0, eval_cfg=None
    ) -> dict:
        """What made an evaluation: the engine, the decoding (`eval_cfg`, default cfg.eval), and the adapter
        (None: the untrained model) and optimizer step it scored."""
        import transformers

        if adapter and Path(adapter).is_relative_to(self.run_dir.dir.parent):
            # named from the sweep's runs/ folder: a moved or repeated sweep records the same protocol
            adapter = str(Path(adapter).relative_to(self.run_dir.dir.parent))
        scored = {"adapter": adapter, "step": step}
        if self.setting.choices:
            scored["decoding"] = "first-token choice among the setting's replies"
        return protocol(
            eval_cfg or self.cfg.eval,
            self.tokenizer,
            self.stop,
            engine_name,
            version or transformers.__version__,
            models.numerics(self.cfg.model)["dtype"],
            **scored,
        )

    def _evaluate_with_engine(self, folder: str) -> None:
        """Every evaluation the record lacks, generated by one vLLM engine process; the adapter gate runs
        on each model it has not checked before, and a failed check keeps no score."""
        cfg, record = self.cfg, self.record
        missing = record.missing_evals(
            cfg.train.epochs, [t.name for t in self.point.test_prompts], cfg.eval.base
        )
        todo = []
        for epoch, names in sorted(missing.items()):
            for test_prompt in self._test_prompts(names):
                hit = elicit.cached_base_eval(cfg, self.setting, test_prompt) if epoch == 0 else None
                if hit:  # the untrained model under this decoding was evaluated before (any run)
                    self._keep(0, test_prompt.name, hit)
                else:
                    todo.append((epoch, test_prompt))
        pending = []  # the sampled estimator's generations on the untrained model, if the cache lacks them
        if "sampled" in self._missing_estimators():
            pending = elicit.sampled_requests(cfg, self.setting, self.examples, [self.point.run_prompt])
            if elicit.decodes_as_eval(cfg, self.setting):  # epoch 0's evaluations serve it: not twice
                epoch0 = {t.name for e, t in todo if e == 0}
                pending = [(p, r) for p, r in pending if p.name not in epoch0]
        if not todo and not pending:
            self._complete_elicitation()
            return
        adapters = {e: record.epochs[str(e)].checkpoint if e else None for e, _ in todo}
        if pending:
            adapters[0] = None
        ungated = {e: a for e, a in adapters.items() if str(e) not in record.engine_checks}
        gate_chats = chats_for(self.setting, self.examples[: cfg.eval.vllm.gate_prompts], None)
        requests = [
            engine.Request(f"{e}/{t.name}", adapters[e], chats_for(self.setting, self.examples, t))
            for e, t in todo
        ]
        requests += [r for _, r in pending]
        if ungated:
            requests += engine.gate_requests(gate_chats, ungated)
        t = time.time()
        version, texts, firsts = engine.generate(
            cfg, self.tokenizer, self.stop, folder, requests, self.run_dir.dir / "engine"
        )
        record.add_timing(engine_s=time.time() - t)
        if ungated:
            checks = engine.gate(cfg, gate_chats, texts, firsts, ungated)
            record.engine_checks = {**record.engine_checks, **{str(e): c for e, c in checks.items()}}
            self.run_dir.save(record)
            engine.require_passed(checks)
        samples: dict[int, dict] = {}
        for (epoch, test_prompt), request in zip(todo, requests):
            result = score(self.setting, self.examples, request.chats, texts[request.key], test_prompt)
            step = record.steps_before(epoch + 1) if epoch else 0
            result["protocol"] = self._protocol("vllm", version, adapters[epoch], step)
            if epoch == 0:
                elicit.keep_base_eval(cfg, self.setting, test_prompt, result)
            self._keep(epoch, test_prompt.name, result)
            samples.setdefault(epoch, {})[test_prompt.name] = result["samples"]
        self.run_dir.save(record)
        elicit.keep_sampled(
            cfg,
            self.setting,
            self.examples,
            pending,
            texts,
            lambda d: self._protocol("vllm", version, eval_cfg=d),
        )
        self._complete_elicitation()  # after epoch 0's evaluations are cached: they may serve it
        for e in record.trained_epochs():
            self._log_once(e, record.epochs[str(e)], samples.get(e, {}))

    def _complete_elicitation(self) -> None:
        """The sampled estimator from the evaluations the engine cached (no model needed)."""
        if "sampled" not in self._missing_estimators():
            return
        self.record.elicitation = {
            **self.record.elicitation,
            **elicit.elicitation(
                self.cfg,
                self.setting,
                None,
                self.tokenizer,
                self.examples,
                self.point.run_prompt,
                ["sampled"],
            ),
        }
        self.run_dir.save(self.record)
        self._log_elicitation()

    def _keep(self, epoch: int, test_prompt: str, result: dict) -> None:
        self.run_dir.write_samples(epoch, test_prompt, result["samples"])
        self.record.add_evaluation(epoch, test_prompt, Evaluation.of(result))

    def _evaluate_checkpoint(self, base, epoch: int, test_prompts: list) -> None:
        """Evaluate an epoch trained earlier (e.g. a PTST point on the control's run): its saved adapter put
        onto the loaded base model, then taken off again (`unload`: the base's own layers back, untouched), so
        no second copy of the base is loaded and training goes on from the model as loaded."""
        import torch
        from peft import PeftModel

        checkpoint, step = self.record.epochs[str(epoch)].checkpoint, self.record.steps_before(epoch + 1)
        full = self.cfg.train.method == "full"  # the checkpoint is a whole model: loaded beside the base
        model = (
            # in fp32, as training kept it (train.trainable) and evaluated it at the epoch's end
            type(base).from_pretrained(checkpoint, dtype=torch.float32).to(base.device)
            if full
            else PeftModel.from_pretrained(base, checkpoint)
        )
        try:
            for test_prompt in test_prompts:
                self._keep(epoch, test_prompt.name, self._evaluate(model, test_prompt, checkpoint, step))
        finally:
            if not full:
                model.unload()
        self.run_dir.save(self.record)

    def _on_epoch_end(self, ep, model) -> None:
        train_s = time.time() - self.epoch_start
        t = time.time()
        evals, samples = {}, {}
        # with vLLM, every epoch is evaluated after training, by one engine
        for test_prompt in self.point.test_prompts if self.engine == "hf" else []:
            step = self.record.steps_before(ep.epoch) + ep.steps
            result = self._evaluate(model, test_prompt, ep.checkpoint, step)
            self.run_dir.write_samples(ep.epoch, test_prompt.name, result["samples"])
            evals[test_prompt.name], samples[test_prompt.name] = Evaluation.of(result), result["samples"]
        entry = Epoch(
            loss=ep.loss,
            steps=ep.steps,
            losses=ep.losses,
            checkpoint=ep.checkpoint,
            train_s=round(train_s, 2),
            eval_s=round(time.time() - t, 2),
            evals=evals,
            # else unset: records as before
            **({"micro_batch": ep.micro_batch} if ep.micro_batch else {}),
            **({"resumed_from_step": ep.resumed_from_step} if ep.resumed_from_step else {}),
        )
        self.record.add_epoch(ep.epoch, entry)
        self.run_dir.save(self.record)
        if self.engine == "hf":
            self._log_once(ep.epoch, entry, samples)
        rates = entry.evals[prompts.NONE].metrics.items() if evals else []
        log.info(
            "epoch %d: loss %.3f, %s",
            ep.epoch,
            ep.loss,
            ", ".join(f"{m}={r['rate']:.2f}" for m, r in rates if r["rate"] is not None),
        )
        self.epoch_start = time.time()

    def _log_once(self, epoch: int, entry: Epoch, samples: dict) -> None:
        """Log an epoch to the run's W&B run unless it already was (a resumed or extended run logs only
        new epochs)."""
        if epoch in self.record.wandb_logged_epochs or self.tracker.run is None or not entry.evals:
            return  # (an epoch the vLLM engine has not evaluated yet is logged once it has)
        self.tracker.log_epoch(epoch, entry.dump(), samples, self.record.steps_before(epoch))
        self.record.mark_logged(epoch)
