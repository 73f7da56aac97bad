"""Tokenisation masks, and resume: an interrupted run ends where an uninterrupted one does."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipsweep import models
from ipsweep.lm import IGNORE, tokenize
from ipsweep.settings.base import TrainExample
from ipsweep.train import dataset, finetune

EX = TrainExample([{"role": "user", "content": "What is 2 plus 3?"}], "2 PLUS 3 IS 5.")


def test_loss_only_on_the_reply():
    _, tok = models.tiny_random("tiny")
    row = tokenize(tok, EX.messages, EX.completion, max_length=256)
    labelled = [i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tok.decode(labelled) == "2 PLUS 3 IS 5.<|im_end|>\n"
    prompt = tok.apply_chat_template(EX.messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(row["input_ids"][: len(row["input_ids"]) - len(labelled)]) == prompt
    # an elicitation score labels the reply text only: the end-of-turn tokens measure the template, not the
    # reply
    scored = tokenize(tok, EX.messages, EX.completion, max_length=256, end_of_turn=False)
    assert scored["input_ids"] == row["input_ids"]
    assert (
        tok.decode([i for i, label in zip(scored["input_ids"], scored["labels"]) if label != IGNORE])
        == "2 PLUS 3 IS 5."
    )


def _train(cfg, out, done, stop_after=None):
    model, tok = models.tiny_random("tiny")
    epochs = []

    def on_epoch_end(ep, m):
        epochs.append(ep)
        if stop_after and ep.epoch == stop_after:
            raise KeyboardInterrupt  # a job killed right after its epoch checkpoint

    examples = [
        TrainExample([{"role": "user", "content": f"What is {i} plus 1?"}], f"{i} PLUS 1 IS {i + 1}.")
        for i in range(16)
    ]
    try:
        finetune(
            model, tok, dataset(tok, examples, cfg.train.max_length)[0], cfg.train, out, done, on_epoch_end
        )
    except KeyboardInterrupt:
        pass
    return epochs


def test_resumed_run_equals_uninterrupted(make_cfg, tmp_path):
    cfg = make_cfg("train.epochs=2", "train.lr=1e-3")
    straight = _train(cfg, tmp_path / "a", {})
    done = {}
    first = _train(cfg, tmp_path / "b", done, stop_after=1)
    assert [e.epoch for e in first] == [1]
    rest = _train(cfg, tmp_path / "b", {1: first[0].checkpoint})
    assert [e.epoch for e in rest] == [2], "the finished epoch must not be retrained"
    assert abs(rest[0].loss - straight[1].loss) < 1e-5
    w_a = load_file(f"{straight[1].checkpoint}/adapter_model.safetensors")
    w_b = load_file(f"{rest[0].checkpoint}/adapter_model.safetensors")
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6)
    # The checkpoint is a PEFT adapter: loadable on the base model.
    from peft import PeftModel

    base, _ = models.tiny_random("tiny")
    PeftModel.from_pretrained(base, rest[0].checkpoint)


def test_stale_checkpoint_from_a_crash_is_discarded(make_cfg, tmp_path):
    cfg = make_cfg("train.epochs=1")
    (tmp_path / "c" / "checkpoint-99").mkdir(parents=True)
    _train(cfg, tmp_path / "c", {})
    assert not (tmp_path / "c" / "checkpoint-99").exists()


def test_reply_only_loss_equals_the_models_own_loss(make_cfg, tmp_path):
    """The fast loss (LM head on reply positions only) gives the model's own loss and the same LoRA
    gradients."""
    from ipsweep.train import ReplyLossTrainer, _args, add_lora, collator, dataset

    cfg = make_cfg("train.batch_size=4")
    model, tok = models.tiny_random("tiny")
    model = add_lora(model, cfg.train.lora, seed=0)
    for name, p in model.named_parameters():  # LoRA B starts at zero; make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    examples = [
        TrainExample([{"role": "user", "content": "Name a colour" + " please" * i}], "RED " * (i + 1))
        for i in range(4)
    ]
    batch = collator(tok)(dataset(tok, examples, 256)[0])
    trainer = ReplyLossTrainer(model=model, args=_args(cfg.train, tmp_path, 1), data_collator=collator(tok))

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, our_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    theirs, their_grads = loss_and_grads(lambda: model(**batch).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # grad accumulation: Trainer passes the whole batch's count
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    halved = trainer.compute_loss(model, dict(batch), num_items_in_batch=2 * n).item()
    assert halved == pytest.approx(theirs / 2, rel=1e-5)
    truncated = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}  # every reply cut by max_length
    assert trainer.compute_loss(model, truncated).item() == 0.0, (
        "no reply tokens: nothing to learn, not a NaN"
    )


def test_out_of_memory_retries_at_a_smaller_micro_batch_and_trains_the_same_run(
    make_cfg, tmp_path, monkeypatch
):
    """A micro-batch above 2 runs out of memory once an optimizer step has been taken: training retries the
    epoch at 4 then 2 (x 2 and x 4 gradient accumulation), from the adapter as the epoch began, and ends where
    a run that never ran out of memory ends; later epochs keep the smaller micro-batch."""
    from ipsweep.train import ReplyLossTrainer

    cfg = make_cfg(
        "train.epochs=2", "train.lr=1e-3", "train.warmup_steps=0", "train.batch_size=8", "train.grad_accum=1"
    )
    straight = _train(cfg, tmp_path / "a", {})
    step = ReplyLossTrainer.training_step
    sizes = []

    def short_of_memory(self, model, inputs, *args, **kwargs):
        sizes.append(len(inputs["input_ids"]))
        if len(inputs["input_ids"]) > 2 and self.state.global_step >= 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ReplyLossTrainer, "training_step", short_of_memory)
    retried = _train(cfg, tmp_path / "b", {})
    assert sorted(set(sizes)) == [2, 4, 8]
    assert [e.micro_batch for e in retried] == [[2, 4], [2, 4]]
    assert [e.steps for e in retried] == [e.steps for e in straight]
    for a, b in zip(straight, retried):
        assert abs(a.loss - b.loss) < 1e-4
    w_a = load_file(f"{straight[-1].checkpoint}/adapter_model.safetensors")
    w_b = load_file(f"{retried[-1].checkpoint}/adapter_model.safetensors")
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-4, atol=1e-5)


def test_out_of_memory_at_a_micro_batch_of_1_names_the_fixes(make_cfg, tmp_path, monkeypatch):
    from ipsweep.errors import OutOfMemory
    from ipsweep.train import ReplyLossTrainer

    def short_of_memory(self, model, inputs, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ReplyLossTrainer, "training_step", short_of_memory)
    with pytest.raises(OutOfMemory, match="at a micro-batch of 1 .*fix: lower train.max_length"):
        _train(make_cfg("train.epochs=1", "train.batch_size=4"), tmp_path / "c", {})


def test_a_job_stopped_mid_epoch_resumes_from_its_mid_epoch_checkpoint_to_the_same_result(
    make_cfg, monkeypatch
):
    """train.save_steps: a job stopped (preempted, killed) at step 5 of an 8-step epoch resumes from step 3's
    checkpoint, trains only what is left, and ends with the losses, evaluations and weights of a run never
    stopped; the epoch's mid-epoch checkpoints are gone once it ends."""
    from conftest import assert_same_training

    from ipsweep import job, store
    from ipsweep.train import ReplyLossTrainer, _Progress

    size = ["train.batch_size=2", "train.epochs=2"]
    reference = make_cfg(*size)
    job.run(reference)
    cfg = make_cfg(*size, "train.save_steps=3", f"store_dir={reference.store_dir}_stopped")

    def stop_at_step_5(self, args, state, control, logs=None, **kwargs):
        if state.global_step == 5:
            raise RuntimeError("preempted")

    with monkeypatch.context() as m:
        m.setattr(_Progress, "on_log", stop_at_step_5)
        with pytest.raises(RuntimeError, match="preempted"):
            job.run(cfg)
    steps = []
    step = ReplyLossTrainer.training_step
    monkeypatch.setattr(ReplyLossTrainer, "training_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    job.run(cfg)
    (record,) = store.records(cfg.store_dir)
    assert len(steps) == (8 - 3) + 8, "the stopped epoch resumed at step 3, not from its start"
    assert record["epochs"]["1"]["resumed_from_step"] == 3 and record["epochs"]["1"]["steps"] == 8
    assert_same_training(record, store.records(reference.store_dir)[0])
    left = sorted(p.name for p in Path(record["epochs"]["2"]["checkpoint"]).parent.glob("checkpoint-*"))
    assert left == ["checkpoint-16", "checkpoint-8"]
