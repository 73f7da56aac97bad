"""Evaluation engines behind one seam (Evaluator): HF inside the training loop (evaluation/hf.py), or one vLLM
engine process after it (evaluation/vllm.py). Both generate through their engine and score with the same
scorers (ipsweep.evaluate), so only the generation differs."""

from __future__ import annotations

from ipsweep.evaluation.base import Context, Evaluator


def evaluator(name: str, ctx: Context) -> Evaluator:
    """The evaluator of engine `name` (eval.engine, or hf for a setting that chooses among fixed replies)."""
    if name == "vllm":
        from ipsweep.evaluation.vllm import VllmEvaluator

        return VllmEvaluator(ctx)
    from ipsweep.evaluation.hf import HfEvaluator

    return HfEvaluator(ctx)


__all__ = ["Context", "Evaluator", "evaluator"]
