"""Evaluation with vLLM after training (eval.engine=vllm): one engine process generates every evaluation the
record lacks (the untrained model and each epoch's adapter, under every test prompt) and the sampled
estimator's replies; the adapter gate checks each model it has not checked before, and a failed check keeps
no score."""

from __future__ import annotations

import time

from ipsweep import elicit, engine
from ipsweep.evaluate import chats_for, score
from ipsweep.evaluation.base import Evaluator


class VllmEvaluator(Evaluator):
    engine = "vllm"
    elicits = ("sampled",)  # its replies join the engine's pass

    def finish(self) -> None:
        ctx = self.ctx
        self._evaluate_with_engine(engine.model_folder(ctx.cfg, ctx.run_dir.dir / "engine" / "model"))

    def _evaluate_with_engine(self, folder: str) -> None:
        ctx = self.ctx
        cfg, record, setting = ctx.cfg, ctx.record, ctx.setting
        todo = []
        for epoch, names in sorted(ctx.missing().items()):
            for test_prompt in ctx.test_prompts(names):
                hit = elicit.cached_base_eval(cfg, setting, test_prompt) if epoch == 0 else None
                if hit:  # the untrained model under this decoding was evaluated before (any run)
                    ctx.keep(0, test_prompt.name, hit)
                else:
                    todo.append((epoch, test_prompt))
        pending = []  # the sampled estimator's generations on the untrained model, if the cache lacks them
        if "sampled" in ctx.missing_estimators():
            pending = elicit.sampled_requests(cfg, setting, ctx.examples, [ctx.point.run_prompt])
            if elicit.decodes_as_eval(cfg, setting):  # epoch 0's evaluations serve it: not twice
                epoch0 = {t.name for e, t in todo if e == 0}
                pending = [(p, r) for p, r in pending if p.name not in epoch0]
        if not todo and not pending:
            self._complete_elicitation()
            return
        adapters = {e: record.epochs[str(e)].checkpoint if e else None for e, _ in todo}
        if pending:
            adapters[0] = None
        ungated = {e: a for e, a in adapters.items() if str(e) not in record.engine_checks}
        gate_chats = chats_for(setting, ctx.examples[: cfg.eval.vllm.gate_prompts], None)
        requests = [
            engine.Request(f"{e}/{t.name}", adapters[e], chats_for(setting, ctx.examples, t)) for e, t in todo
        ]
        requests += [r for _, r in pending]
        if ungated:
            requests += engine.gate_requests(gate_chats, ungated)
        t = time.time()
        version, texts, firsts = engine.generate(
            cfg, ctx.tokenizer, ctx.stop, folder, requests, ctx.run_dir.dir / "engine"
        )
        record.add_timing(engine_s=time.time() - t)
        if ungated:
            checks = engine.gate(cfg, gate_chats, texts, firsts, ungated)
            record.engine_checks = {**record.engine_checks, **{str(e): c for e, c in checks.items()}}
            ctx.save()
            engine.require_passed(checks)
        samples: dict[int, dict] = {}
        for (epoch, test_prompt), request in zip(todo, requests):
            result = score(setting, ctx.examples, request.chats, texts[request.key], test_prompt)
            step = record.steps_before(epoch + 1) if epoch else 0
            result["protocol"] = ctx.protocol("vllm", version, adapters[epoch], step)
            if epoch == 0:
                elicit.keep_base_eval(cfg, setting, test_prompt, result)
            ctx.keep(epoch, test_prompt.name, result)
            samples.setdefault(epoch, {})[test_prompt.name] = result["samples"]
        ctx.save()
        elicit.keep_sampled(
            cfg, setting, ctx.examples, pending, texts, lambda d: ctx.protocol("vllm", version, eval_cfg=d)
        )
        self._complete_elicitation()  # after epoch 0's evaluations are cached: they may serve it
        for e in record.trained_epochs():
            ctx.log_once(e, record.epochs[str(e)], samples.get(e, {}))

    def _complete_elicitation(self) -> None:
        """The sampled estimator from the evaluations the engine cached (no model needed)."""
        ctx = self.ctx
        if "sampled" not in ctx.missing_estimators():
            return
        ctx.record.elicitation = {
            **ctx.record.elicitation,
            **elicit.elicitation(
                ctx.cfg, ctx.setting, None, ctx.tokenizer, ctx.examples, ctx.point.run_prompt, ["sampled"]
            ),
        }
        ctx.save()
        ctx.log_elicitation()
