"""SFT with transformers Trainer, LoRA (PEFT) or full fine-tuning (train.method), one epoch at a time.

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
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import find_executable_batch_size
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


@dataclass
class Cut:
    """How many training rows train.max_length cut (reply or end-of-turn), recorded in the run record."""

    cut: int
    of: int
    max_length: int

    def as_dict(self) -> dict:
        return {"cut": self.cut, "of": self.of, "max_length": self.max_length}


def dataset(
    tokenizer, examples: list[TrainExample], max_length: int, max_cut_share: float = 1.0
) -> tuple[list[dict], Cut]:
    """Tokenized training rows and how many were cut. Raises ConfigError before any training when more than
    `max_cut_share` of the rows lose part of their reply (they would teach replies that never end)."""
    rows = [tokenize(tokenizer, ex.messages, ex.completion, max_length) for ex in examples]
    cut = Cut(sum(r.pop("cut") for r in rows), len(rows), max_length)
    if all(all(label == IGNORE for label in r["labels"]) for r in rows):
        raise ConfigError(
            f"every training example loses its reply to truncation at train.max_length={max_length}; "
            "fix: raise train.max_length"
        )
    if cut.cut and cut.cut > max_cut_share * cut.of:
        longest = max(
            len(tokenize(tokenizer, ex.messages, ex.completion, 10**9)["input_ids"]) for ex in examples
        )
        raise ConfigError(
            f"train.max_length={max_length} cuts the reply of {cut.cut} of {cut.of} training examples "
            f"(more than train.max_cut_share={max_cut_share}); the longest needs {longest} tokens; fix: "
            f"train.max_length={longest}, or allow the cut with train.max_cut_share=<share>"
        )
    if cut.cut:
        log.warning(
            "train.max_length=%d cuts the reply of %d of %d training examples (recorded in the run record)",
            max_length,
            cut.cut,
            cut.of,
        )
    return rows, cut


def trainable(model, cfg):
    """The model as train.method trains it: LoRA adapters on the frozen model, or every weight (full)."""
    if cfg.get("method", "lora") == "full":
        # fp32 master weights (a bf16 model would lose updates below its precision, lr x weight ~ 1e-6);
        # the forward and backward still run in the loaded dtype, under the autocast compute_loss enters
        return model.float().requires_grad_(True)
    return add_lora(model, cfg.lora, cfg.seed)


def add_lora(model, lora_cfg, seed: int):
    set_seed(seed)  # the LoRA init depends on the run's seed only
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        use_rslora=lora_cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@dataclass
class EpochLog:
    epoch: int
    steps: int
    loss: float  # mean training loss over the epoch's optimizer steps
    losses: list[float]
    checkpoint: str
    # [micro-batch, gradient accumulation] it trained at where out-of-memory made the micro-batch smaller
    micro_batch: list[int] | None = None
    resumed_from_step: int | None = None  # a mid-epoch checkpoint (train.save_steps) it resumed from


class Micro:
    """The micro-batch a run trains at. On out-of-memory it halves (to a divisor of the effective batch, down
    to 1) and the gradient accumulation grows to keep the effective batch, so the run, its signature and its
    numbers stay the same (the loss is normalised by the accumulated batch's reply tokens); later epochs
    keep the smaller size."""

    def __init__(self, cfg):
        self.cfg, self.size, self.epoch = cfg, cfg.batch_size, 0
        self.effective = cfg.batch_size * cfg.grad_accum

    def halve(self) -> int:
        cfg = self.cfg
        if self.size == 1:
            raise OutOfMemory(
                f"out of GPU memory while training epoch {self.epoch} at a micro-batch of 1 "
                f"(train.batch_size={cfg.batch_size} x train.grad_accum={cfg.grad_accum}, "
                f"train.max_length={cfg.max_length}, "
                f"train.gradient_checkpointing={cfg.gradient_checkpointing}); fix: lower train.max_length, "
                "set train.gradient_checkpointing=true, or use a smaller model or a larger GPU"
            )
        smaller = max(d for d in range(1, self.size // 2 + 1) if self.effective % d == 0)
        log.warning(
            "out of memory while training epoch %d at a micro-batch of %d; retrying the epoch at %d x %d "
            "gradient accumulation (the same effective batch of %d)",
            self.epoch,
            self.size,
            smaller,
            self.effective // smaller,
            self.effective,
        )
        self.size = smaller
        return smaller


class _Watch(TrainerCallback):
    """Collect per-step losses; stop with a clear error when the loss is not finite."""

    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise DivergedError(
                    f"training loss became {loss} at step {state.global_step}; fix: lower train.lr or "
                    "check the data"
                )
            self.losses.append(loss)


class _Progress(TrainerCallback):
    """Training progress: a tqdm bar (steps, loss, it/s, ETA) on a terminal; elsewhere (SLURM logs, CI) a log
    line every tenth of the epoch, so a log file shows how far a job got."""

    def __init__(self, epoch: int, epochs: int):
        self.epoch, self.epochs, self.bar, self.start = epoch, epochs, None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        import sys
        import time

        from tqdm.auto import tqdm

        self.first, self.start = state.global_step, time.time()
        self.total = state.max_steps - state.global_step
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=self.total, desc=f"train epoch {self.epoch}/{self.epochs}", unit="step", leave=False
            )

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
            log.info(
                "train epoch %d/%d: step %d/%d, loss %.3f, %.1f s/step, ETA %.0f s",
                self.epoch,
                self.epochs,
                done,
                self.total,
                logs["loss"],
                per_step,
                per_step * (self.total - done),
            )

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
        # label_logits calls the decoder, not PeftModel.forward, where accelerate installs the run's autocast:
        # so it is entered here (bf16/fp16 compute as TrainingArguments say; fp32: a no-op)
        with self.accelerator.autocast():
            logits = label_logits(model, inputs["input_ids"], inputs["attention_mask"], keep)
        loss = F.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
        # Normalised as HF's own loss: by the accumulated batch's token count when Trainer passes it (then
        # Trainer does not divide again), else per micro-batch (then Trainer divides by grad_accum).
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        # a batch of fully truncated replies: 0
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        return (loss, None) if return_outputs else loss


# transformers renamed gradient_checkpointing to activation_checkpointing (5.2x); the floor pyproject allows
# has only the old name, which the newer versions keep as a deprecated alias.
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
    else "gradient_checkpointing"
)


def precision(dtype: torch.dtype, device: str, tf32: bool = False) -> dict:
    """TrainingArguments' numerics for a model loaded in `dtype`: its forward and backward run under autocast
    in that dtype (fp16 with a loss scaler), while the trained weights stay fp32 (LoRA adapters, and a full
    fine-tune's master weights); an fp32 model computes in fp32, in TF32 on a GPU where train.tf32 allows."""
    return {
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "tf32": bool(tf32) if device == "cuda" else None,
    }


def _args(cfg, out_dir: Path, epochs: int, device: str = "cpu", micro: int | None = None, dtype=None):
    """`micro`: the micro-batch to train at (default train.batch_size), with the gradient accumulation that
    keeps the effective batch train.batch_size x train.grad_accum; `dtype`: the model's as loaded (precision).
    """
    cuda = device == "cuda"
    micro = micro or cfg.batch_size
    args = TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.batch_size * cfg.grad_accum // micro,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy=cfg.sampling,
        full_determinism=cfg.deterministic,
        logging_steps=1,
        report_to=[],
        # Trainer would otherwise log a NaN step as the running mean, hiding divergence.
        logging_nan_inf_filter=False,
        # train.save_steps: also inside an epoch; either way a checkpoint ends each epoch (each epoch is one
        # train() call, and Trainer saves at its end under the steps strategy too)
        save_strategy="steps" if cfg.get("save_steps") else "epoch",
        save_steps=cfg.get("save_steps") or 500,
        use_cpu=not cuda,
        **precision(dtype or torch.float32, device, cfg.get("tf32", False)),
        dataloader_num_workers=0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",  # one kernel for all LoRA tensors on a GPU
        disable_tqdm=True,
        save_only_model=False,
        **{_CHECKPOINTING: cfg.gradient_checkpointing, f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False}},
    )
    return single_device(args)


def single_device(args: TrainingArguments) -> TrainingArguments:
    """One job trains on one device. Where a process sees several GPUs (an in-process sweep on a multi-GPU
    node, SLURM with gpus_per_node > 1), Trainer would wrap the model in nn.DataParallel and multiply the
    batch by the number of GPUs, which changes the run. ipsweep has no data-parallel mode (docs/cluster.md,
    "One GPU per job")."""
    if args.n_gpu > 1:
        log.warning(
            "this job sees %d GPUs and trains on one (%s); the others stay idle. Give each job one GPU "
            "(hydra/launcher=local_gpus, or SLURM gpus_per_node=1) to run jobs side by side",
            args.n_gpu,
            args.device,
        )
        args._n_gpu = 1  # Trainer's own switch (it sets it so for model-parallel models): no DataParallel
    return args


def _train_epoch(batch_size, model, tokenizer, rows, cfg, out_dir, epoch, device, dtype, resume, weights):
    """One epoch at a micro-batch of `batch_size`, from `weights` (the adapter as the epoch began), resuming
    the Trainer from checkpoint `resume` (the last epoch's, a mid-epoch one, or None)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in weights:
                p.copy_(weights[n])
    watch = _Watch()
    trainer = ReplyLossTrainer(
        model=model,
        args=_args(cfg, out_dir, epoch, device, batch_size, dtype),
        train_dataset=rows,
        data_collator=collator(tokenizer),
        callbacks=[watch, _Progress(epoch, cfg.epochs)],
    )
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the record keeps the losses
    trainer.train(resume_from_checkpoint=resume)
    return trainer, watch


def finetune(
    model,
    tokenizer,
    rows: list[dict],
    cfg,
    out_dir: Path,
    done: dict[int, str],
    on_epoch_end: Callable[[EpochLog, PeftModel], None],
) -> PeftModel:  # (the model itself, trained, when train.method=full)
    """Train epochs len(done)+1 .. cfg.epochs, calling `on_epoch_end` after each.

    `rows` are the tokenized training examples (`dataset`). `done` maps finished epochs to their checkpoint
    folders (from the run record); training resumes from the last one. Checkpoint folders the record does not
    know (a crash mid-save) are deleted.
    """
    out_dir = Path(out_dir)
    start = max(done, default=0)
    mid = _mid_epoch_checkpoint(out_dir, done, start)
    known = {*done.values(), *([mid] if mid else [])}
    for stale in out_dir.glob("checkpoint-*"):
        if str(stale) not in known:
            shutil.rmtree(stale, ignore_errors=True)
    device = next(model.parameters()).device.type
    dtype = model.dtype  # as loaded (before a full fine-tune's fp32 master weights): the compute dtype
    model = trainable(model, cfg)
    micro = Micro(cfg)
    for epoch in range(start + 1, cfg.epochs + 1):
        mid_way = bool(mid) and epoch == start + 1
        resume = mid if mid_way else done.get(epoch - 1)
        if mid_way:
            log.info("resuming epoch %d mid-way, from %s", epoch, mid)
        # the trained weights as the epoch starts (in host memory: a full fine-tune's are the whole model): an
        # attempt that ran out of memory may have taken optimizer steps
        weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        micro.epoch = epoch
        # a module-level function, its inputs passed as arguments: a failed job's traceback then holds the
        # model only in frame locals, which job.release clears (a closure's cells would keep it alive)
        train_epoch = find_executable_batch_size(
            _train_epoch, starting_batch_size=micro.size, reduce_batch_size_fn=micro.halve
        )
        trainer, _ = train_epoch(model, tokenizer, rows, cfg, out_dir, epoch, device, dtype, resume, weights)
        del weights, train_epoch
        first = _step(done.get(epoch - 1))
        checkpoint = str(out_dir / f"checkpoint-{trainer.state.global_step}")
        done[epoch] = checkpoint
        # the epoch's losses as Trainer logged them, those before a mid-epoch resume included
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > first]
        log_ = EpochLog(epoch, len(losses), sum(losses) / max(len(losses), 1), losses, checkpoint)
        if micro.size != cfg.batch_size:
            log_.micro_batch = [micro.size, micro.effective // micro.size]
        if mid_way:
            log_.resumed_from_step = _step(mid)
        for inside in out_dir.glob("checkpoint-*"):  # this epoch's mid-epoch checkpoints: no longer needed
            if first < _step(inside) < trainer.state.global_step:
                shutil.rmtree(inside, ignore_errors=True)
        on_epoch_end(log_, model)
    return model


def _step(checkpoint: str | Path | None) -> int:
    """The optimizer step of a checkpoint folder (checkpoint-<step>); 0 for none."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def _mid_epoch_checkpoint(out_dir: Path, done: dict[int, str], start: int) -> str | None:
    """The newest complete checkpoint after the last finished epoch's (train.save_steps, or an epoch's end
    that the record did not take in before the job stopped): training resumes from it."""
    after = _step(done.get(start))
    complete = [
        c
        for c in out_dir.glob("checkpoint-*")
        if c.name.rsplit("-", 1)[1].isdigit()
        and _step(c) > after
        and all((c / f).exists() for f in ("trainer_state.json", "optimizer.pt", "rng_state.pth"))
    ]
    return str(max(complete, key=_step)) if complete else None
