"""Benchmark 1: training throughput of ipsweep's step vs the authors' way, same model, data, LoRA and steps.

Arms, each on a fresh copy of the model with the same LoRA init and the same examples:
- reference: as the authors' trainer does it: every example padded to max_length (415), fp32, plain
  transformers Trainer (logits and loss at every position), shuffled batches.
- ipsweep default: the default code path (ipsweep.train): the same shuffled batches, each padded to its
  longest row, LM head on reply positions only; bf16 autocast and fused AdamW on a GPU. Its per-step
  losses must equal the reference's (the speed-ups change no number).
- ipsweep, train.sampling=group_by_length: the opt-in length grouping (less padding, other batches).
- ipsweep default, next seed: how far the losses move with the seed alone, the yardstick for "within noise".
Throughput counts real (non-padding) tokens. Loss agreement: per-step losses of the default arm vs the
reference, and a held-out loss after training for every arm.

  python benchmarks/train_throughput.py --steps 16                           # CPU: gcd_sycophancy, 128
  examples python benchmarks/train_throughput.py --steps 16 --setting trait_pair # CPU: short examples python
  benchmarks/train_throughput.py --steps 30 # GPU, the authors' ~30 effective steps Length grouping needs a
  few batches to group: transformers' sampler sorts within mega-batches of min(50, n // (4 x batch)) batches,
  so below 64 examples it groups nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch
from common import MODEL_HELP, PEAK_BF16, Timer, compose, device, model_overrides, peak_flops, save
from transformers import DataCollatorForSeq2Seq, Trainer
from transformers.trainer_callback import PrinterCallback

from ipsweep import models
from ipsweep.lm import IGNORE, collator
from ipsweep.settings.base import build
from ipsweep.train import ReplyLossTrainer, _args, _Watch, add_lora, dataset


def held_out_loss(model, tok, rows) -> float:
    """Mean reply-token loss with the model's own loss, the same for every arm."""
    model.eval()
    pad, total, count = collator(tok), 0.0, 0
    device_ = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = pad(rows[i : i + 8]).to(device_)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += model(**batch).loss.float().item() * n
            count += n
    return total / count


def run_arm(name, base_model, tok, rows, held_out, cfg, out_dir, reference: bool) -> dict:
    model = copy.deepcopy(base_model)
    if reference:
        model = model.float()
    model = add_lora(model, cfg.train.lora, cfg.train.seed)
    args = _args(
        cfg.train, out_dir / name, epochs=1, device=models.resolve_device(cfg.model), dtype=model.dtype
    )
    args = dataclasses.replace(args, save_strategy="no", **({"bf16": False} if reference else {}))
    if reference:  # every row padded to max_length, as the authors' tokenisation does
        tok.padding_side = "right"
        data_collator = DataCollatorForSeq2Seq(
            tok, padding="max_length", max_length=cfg.train.max_length, label_pad_token_id=IGNORE
        )
        trainer_cls = Trainer
    else:
        data_collator, trainer_cls = collator(tok), ReplyLossTrainer
    watch, processed = _Watch(), []

    def counting_collator(features):  # positions the model computes, padding included
        batch = data_collator(features)
        processed.append(batch["input_ids"].numel())
        return batch

    trainer = trainer_cls(
        model=model, args=args, train_dataset=rows, data_collator=counting_collator, callbacks=[watch]
    )
    trainer.remove_callback(PrinterCallback)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with Timer() as t:
        trainer.train()
    tokens = sum(len(r["input_ids"]) for r in rows)
    row = {
        "arm": name,
        "steps": len(watch.losses),
        "seconds": t.s,
        "tokens_per_s": tokens / t.s,
        "padding_share": 1 - tokens / sum(processed),
        "mean_loss": sum(watch.losses) / len(watch.losses),
        "held_out_loss": held_out_loss(model, tok, held_out),
    }
    if torch.cuda.is_available():
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        # 4N per real token: forward 2N, backward to the activations 2N (frozen weights get no gradient)
        if peak_flops():
            n_params = sum(p.numel() for p in model.parameters())
            row["mfu"] = 4 * n_params * tokens / t.s / peak_flops()
    return row, watch.losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help=MODEL_HELP)
    ap.add_argument("--setting", default="gcd_sycophancy")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=415, help="the authors' max_seq_length")
    ap.add_argument("--out", default="/tmp/ipsweep-bench-train")
    a = ap.parse_args()

    cfg = compose(
        *model_overrides(a.model),
        f"setting={a.setting}",
        f"train.batch_size={a.batch_size}",
        f"train.max_length={a.max_length}",
        "train.warmup_steps=2",
    )
    base_model, tok = models.load(cfg.model)
    examples = build(cfg.setting).train_examples()
    n = a.steps * a.batch_size
    rows, held_out = (
        dataset(tok, examples[:n], a.max_length)[0],
        dataset(tok, examples[n : n + 32], a.max_length)[0],
    )
    out = Path(a.out)
    seed = cfg.train.seed
    arms = [
        ("reference (pad to max, fp32, full logits)", True, "random", seed),
        ("ipsweep default", False, "random", seed),
        ("ipsweep, train.sampling=group_by_length", False, "group_by_length", seed),
        # How much the losses move with the seed alone (LoRA init, batch order): the noise to compare with.
        ("ipsweep default, next seed (noise yardstick)", False, "random", seed + 1),
    ]
    cfg.train.sampling = "random"  # untimed warm-up step, so no arm pays the process's first-step costs
    run_arm("warm-up", base_model, tok, rows[: a.batch_size], held_out[:1], cfg, out, reference=False)
    results, losses = [], {}
    for name, reference, sampling, arm_seed in arms:
        cfg.train.sampling, cfg.train.seed = sampling, arm_seed
        row, losses[name] = run_arm(name, base_model, tok, rows, held_out, cfg, out, reference)
        results.append(row)
    ref = results[0]
    for row in results:
        row["speedup"] = row["tokens_per_s"] / ref["tokens_per_s"]
    same_batches = max(abs(x - y) for x, y in zip(losses[arms[0][0]], losses[arms[1][0]]))
    save(
        f"train_throughput_{a.setting}",
        results,
        model=a.model,
        setting=a.setting,
        steps=a.steps,
        batch_size=a.batch_size,
        max_length=a.max_length,
        max_abs_step_loss_diff_same_batches=same_batches,
        step_losses=losses,
        mfu_peak_flops=PEAK_BF16 if torch.cuda.is_available() else None,
        on=device(),
    )


if __name__ == "__main__":
    main()
