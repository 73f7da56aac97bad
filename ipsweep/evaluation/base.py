"""What both evaluation engines share: the point's context (record, run folder, eval items, tokenizer) and
what happens at each epoch's end: the epoch recorded with its evaluations (if the engine made them then)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ipsweep import models, prompts
from ipsweep.evaluate import protocol
from ipsweep.record import Epoch, Evaluation, Record
from ipsweep.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a point's evaluation works on: its config, its plan (setting, run folder, test prompts), its
    record, the W&B tracker, the run's tokenizer and stop tokens, and its eval items."""

    cfg: object
    point: object
    record: Record
    tracker: Tracker
    tokenizer: object
    stop: list[int]
    examples: list

    @property
    def setting(self):
        return self.point.setting

    @property
    def run_dir(self):
        return self.point.run

    def save(self) -> None:
        self.run_dir.save(self.record)

    def test_prompts(self, names: list[str]) -> list:
        return [t for t in self.point.test_prompts if t.name in names]

    def missing(self) -> dict[int, list[str]]:
        """Per epoch, the test prompts the record has no evaluation under (epoch 0: the untrained model)."""
        cfg = self.cfg
        return self.record.missing_evals(
            cfg.train.epochs, [t.name for t in self.point.test_prompts], cfg.eval.base
        )

    def missing_estimators(self) -> list[str]:
        return [e for e in self.cfg.elicit.estimators if e not in (self.record.elicitation or {})]

    def protocol(
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

    def keep(self, epoch: int, test_prompt: str, result: dict) -> None:
        self.run_dir.write_samples(epoch, test_prompt, result["samples"])
        self.record.add_evaluation(epoch, test_prompt, Evaluation.of(result))

    def log_elicitation(self) -> None:
        self.tracker.summary(
            {
                f"elicitation/{est}/{k}": v[k]
                for est, v in self.record.elicitation.items()
                for k in ("estimate", "lo", "hi")
                if k in v
            }
        )

    def log_once(self, epoch: int, entry: Epoch, samples: dict) -> None:
        """Log an epoch to the run's W&B run unless it already was (a resumed or extended run logs only
        new epochs)."""
        record = self.record
        if epoch in record.wandb_logged_epochs or self.tracker.run is None or not entry.evals:
            return  # (an epoch the vLLM engine has not evaluated yet is logged once it has)
        self.tracker.log_epoch(epoch, entry.dump(), samples, record.steps_before(epoch))
        record.mark_logged(epoch)


class Evaluator:
    """The seam between a point's training and its evaluations. The job calls, in order: before_training
    (the untrained model, as loaded), start (the clock of the first epoch), epoch_end after each trained
    epoch (finetune's callback), and finish once training is over and its model released. An engine
    evaluates in whichever of them it needs; every epoch is recorded as it ends either way."""

    engine = "hf"
    # estimators this engine produces itself, from its own generations (the job elicits the others)
    elicits: tuple[str, ...] = ()

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.epoch_start = time.time()

    def before_training(self, model) -> None:
        pass

    def evaluate_epoch(self, epoch: int, model, checkpoint: str, step: int) -> tuple[dict, dict]:
        """({test prompt: Evaluation}, {test prompt: samples}) of an epoch that just ended (none here)."""
        return {}, {}

    def finish(self) -> None:
        pass

    def start(self) -> None:
        self.epoch_start = time.time()

    def epoch_end(self, ep, model) -> None:
        """finetune's callback: the epoch's evaluations (evaluate_epoch), then the epoch in the record."""
        ctx = self.ctx
        train_s = time.time() - self.epoch_start
        t = time.time()
        step = ctx.record.steps_before(ep.epoch) + ep.steps
        evals, samples = self.evaluate_epoch(ep.epoch, model, ep.checkpoint, step)
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
        ctx.record.add_epoch(ep.epoch, entry)
        ctx.save()
        ctx.log_once(ep.epoch, entry, samples)
        rates = entry.evals[prompts.NONE].metrics.items() if evals else []
        log.info(
            "epoch %d: loss %.3f, %s",
            ep.epoch,
            ep.loss,
            ", ".join(f"{m}={r['rate']:.2f}" for m, r in rates if r["rate"] is not None),
        )
        self.epoch_start = time.time()
