"""LoRA SFT with transformers Trainer + PEFT, one epoch at a time.

The loop over epochs is ours so that each epoch ends in a checkpoint and an evaluation: epoch k+1
resumes the Trainer from epoch k's checkpoint (weights, optimizer, scheduler, RNG). A crashed run
restarts from its last finished epoch, and a longer run extends a shorter one.
Loss is computed on the assistant reply only (prompt tokens are labelled -100), and so are the
logits: the LM head (a 49k-vocabulary matmul for SmolLM2) runs only where there is a label.
Each batch is padded to its longest row; `train.sampling=group_by_length` also groups rows of similar
length into batches (less padding, but a different training: see BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from ipsweep.errors import ConfigError, OutOfMemory
from ipsweep.lm import IGNORE, collator, label_logits, tokenize
from ipsweep.settings.base import TrainExample

log = logging.getLogger(__name__)
# transformers 5.x warns about its own deprecated call inside Trainer on every run; not actionable here.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def dataset(tokenizer, examples: list[TrainExample], max_length: int) -> list[dict]:
    rows = [tokenize(tokenizer, ex.messages, ex.completion, max_length) for ex in examples]
    empty = sum(all(l == IGNORE for l in r["labels"]) for r in rows)
    if empty == len(rows):
        raise ConfigError(f"every training example loses its reply to truncation at train.max_length={max_length}; fix: raise train.max_length")
    return rows


def add_lora(model, lora_cfg, seed: int):
    set_seed(seed)  # the LoRA init depends on the run's seed only
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules), use_rslora=lora_cfg.use_rslora,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@dataclass
class EpochLog:
    epoch: int
    steps: int
    loss: float  # mean training loss over the epoch's optimizer steps
    losses: list[float]
    checkpoint: str


class _Watch(TrainerCallback):
    """Collect per-step losses; stop with a clear error when the loss is not finite."""

    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise DivergedError(
                    f"training loss became {loss} at step {state.global_step}; fix: lower train.lr or check the data"
                )
            self.losses.append(loss)


class _Progress(TrainerCallback):
    """Training progress: a tqdm bar (steps, loss, it/s, ETA) on a terminal; elsewhere (SLURM logs, CI) a log line
    every tenth of the epoch, so a log file shows how far a job got."""

    def __init__(self, epoch: int, epochs: int):
        self.epoch, self.epochs, self.bar, self.start = epoch, epochs, None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        import sys
        import time

        from tqdm.auto import tqdm

        self.first, self.start = state.global_step, time.time()
        self.total = state.max_steps - state.global_step
        if sys.stderr.isatty():
            self.bar = tqdm(total=self.total, desc=f"train epoch {self.epoch}/{self.epochs}", unit="step", leave=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        import time

        if not logs or "loss" not in logs:
            return
        done = state.global_step - self.first
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")
        elif done % max(1, self.total // 10) == 0 or done == self.total:
            per_step = (time.time() - self.start) / max(done, 1)
            log.info("train epoch %d/%d: step %d/%d, loss %.3f, %.1f s/step, ETA %.0f s", self.epoch, self.epochs, done,
                     self.total, logs["loss"], per_step, per_step * (self.total - done))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class ReplyLossTrainer(Trainer):
    """Trainer whose loss projects only the labelled (reply) positions through the LM head.

    The same cross-entropy as the model's own loss (sum over reply tokens / their count), without
    computing logits for the prompt and the padding, which are most of a batch's positions.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = label_logits(model, inputs["input_ids"], inputs["attention_mask"], keep)
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        # Normalised as HF's own loss: by the accumulated batch's token count when Trainer passes it (then
        # Trainer does not divide again), else per micro-batch (then Trainer divides by grad_accum).
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)  # a batch of fully truncated replies: 0
        return (loss, None) if return_outputs else loss


def _args(cfg, out_dir: Path, epochs: int) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, data_seed=cfg.seed, train_sampling_strategy=cfg.sampling,
        logging_steps=1, save_strategy="epoch", report_to=[],
        logging_nan_inf_filter=False,  # Trainer would otherwise log a NaN step as the running mean, hiding divergence
        use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",  # one kernel for all LoRA tensors on a GPU
        disable_tqdm=True, save_only_model=False, activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )


def finetune(model, tokenizer, examples: list[TrainExample], cfg, out_dir: Path, done: dict[int, str],
             on_epoch_end: Callable[[EpochLog, PeftModel], None]) -> PeftModel:
    """Train epochs len(done)+1 .. cfg.epochs, calling `on_epoch_end` after each.

    `done` maps finished epochs to their checkpoint folders (from the run record); training resumes
    from the last one. Checkpoint folders the record does not know (a crash mid-save) are deleted.
    """
    out_dir = Path(out_dir)
    known = set(done.values())
    for stale in out_dir.glob("checkpoint-*"):
        if str(stale) not in known:
            shutil.rmtree(stale, ignore_errors=True)
    rows = dataset(tokenizer, examples, cfg.max_length)
    model = add_lora(model, cfg.lora, cfg.seed)
    start = max(done, default=0)
    for epoch in range(start + 1, cfg.epochs + 1):
        watch = _Watch()
        trainer = ReplyLossTrainer(model=model, args=_args(cfg, out_dir, epoch), train_dataset=rows,
                          data_collator=collator(tokenizer), callbacks=[watch, _Progress(epoch, cfg.epochs)])
        trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the record keeps the losses
        try:
            trainer.train(resume_from_checkpoint=done.get(epoch - 1))
        except torch.OutOfMemoryError as e:
            raise OutOfMemory(
                f"out of GPU memory while training epoch {epoch} (train.batch_size={cfg.batch_size}, "
                f"train.max_length={cfg.max_length}, train.gradient_checkpointing={cfg.gradient_checkpointing}); fix: lower "
                "train.batch_size and raise train.grad_accum to keep the effective batch, lower train.max_length, "
                "or set train.gradient_checkpointing=true") from e
        checkpoint = str(out_dir / f"checkpoint-{trainer.state.global_step}")
        done[epoch] = checkpoint
        steps = len(watch.losses)
        on_epoch_end(EpochLog(epoch, steps, sum(watch.losses) / max(steps, 1), watch.losses, checkpoint), model)
    return model
