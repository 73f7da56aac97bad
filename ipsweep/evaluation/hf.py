"""Evaluation with HF transformers inside the job's training loop: the untrained model before training, each
epoch's model as its epoch ends, and an epoch trained earlier (a PTST point on the control's run) from its
saved checkpoint."""

from __future__ import annotations

from ipsweep import elicit
from ipsweep.evaluate import evaluate
from ipsweep.evaluation.base import Evaluator
from ipsweep.record import Evaluation


class HfEvaluator(Evaluator):
    engine = "hf"

    def before_training(self, model) -> None:
        """Evaluations the record lacks for epochs it has: epoch 0 on the base model, trained epochs on
        their saved checkpoints (e.g. a PTST point that reuses the control's run)."""
        ctx = self.ctx
        missing = ctx.missing()
        if 0 in missing:
            for test_prompt in ctx.test_prompts(missing[0]):
                result = elicit.base_eval(
                    ctx.cfg, ctx.setting, model, ctx.tokenizer, ctx.examples, test_prompt
                )
                ctx.keep(0, test_prompt.name, {**result, "protocol": ctx.protocol("hf")})
            ctx.save()
        for epoch in sorted(e for e in missing if e > 0 and str(e) in ctx.record.epochs):
            self._evaluate_checkpoint(model, epoch, ctx.test_prompts(missing[epoch]))

    def evaluate_epoch(self, epoch: int, model, checkpoint: str, step: int) -> tuple[dict, dict]:
        evals, samples = {}, {}
        for test_prompt in self.ctx.point.test_prompts:
            result = self._evaluate(model, test_prompt, checkpoint, step)
            self.ctx.run_dir.write_samples(epoch, test_prompt.name, result["samples"])
            evals[test_prompt.name], samples[test_prompt.name] = Evaluation.of(result), result["samples"]
        return evals, samples

    def _evaluate(self, model, test_prompt, adapter: str, step: int) -> dict:
        ctx = self.ctx
        result = evaluate(model, ctx.tokenizer, ctx.setting, ctx.examples, test_prompt, ctx.cfg.eval)
        return {**result, "protocol": ctx.protocol("hf", adapter=adapter, step=step)}

    def _evaluate_checkpoint(self, base, epoch: int, test_prompts: list) -> None:
        """Evaluate an epoch trained earlier: its saved adapter put onto the loaded base model, then taken off
        again (`unload`: the base's own layers back, untouched), so no second copy of the base is loaded and
        training goes on from the model as loaded."""
        import torch
        from peft import PeftModel

        ctx = self.ctx
        checkpoint, step = ctx.record.epochs[str(epoch)].checkpoint, ctx.record.steps_before(epoch + 1)
        full = ctx.cfg.train.method == "full"  # the checkpoint is a whole model: loaded beside the base
        model = (
            # in fp32, as training kept it (train.trainable) and evaluated it at the epoch's end
            type(base).from_pretrained(checkpoint, dtype=torch.float32).to(base.device)
            if full
            else PeftModel.from_pretrained(base, checkpoint)
        )
        try:
            for test_prompt in test_prompts:
                ctx.keep(epoch, test_prompt.name, self._evaluate(model, test_prompt, checkpoint, step))
        finally:
            if not full:
                model.unload()
        ctx.save()
