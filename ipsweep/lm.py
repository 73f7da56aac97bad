"""Language-model primitives shared by training, evaluation and elicitation: chat tokenisation with
reply labels, logits of labelled positions only, reply log-probs, and batched generation.

Nothing here knows about settings, prompts or runs; it turns chats into tensors and back.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq

from ipsweep.errors import ConfigError, OutOfMemory

IGNORE = -100


def tokenize(tokenizer, messages: list[dict], reply: str, max_length: int, end_of_turn: bool = True) -> dict:
    """Chat-template `messages` + the assistant `reply`; labels cover the reply only (prompt tokens are
    IGNORE).

    end_of_turn: also label the template's end-of-turn tokens after the reply (training wants them, so the
    model learns to stop; an elicitation score does not: they measure the template, not the reply).
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError(
            "the model's chat template does not extend the prompt with the reply; fix: use a model whose "
            "template does"
        )
    tail = full[len(prompt) :]
    cut = (
        tail.find(reply.strip()) + len(reply.strip())
        if reply.strip() and reply.strip() in tail
        else len(tail)
    )
    # Tokenise the parts separately so no token straddles the prompt/reply/end-of-turn boundaries.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(tail[:cut], add_special_tokens=False)["input_ids"]
    end_ids = tokenizer(tail[cut:], add_special_tokens=False)["input_ids"] if cut < len(tail) else []
    whole = prompt_ids + reply_ids + end_ids
    ids = whole[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + reply_ids + (end_ids if end_of_turn else [IGNORE] * len(end_ids)))[
        :max_length
    ]
    # cut: max_length took part of the reply or its end-of-turn (training would teach a reply that never ends)
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "cut": len(whole) > max_length,
    }


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special tokens the chat template puts right after an assistant reply (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`): what training teaches the model to emit when its reply is over."""
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Fine."}], tokenize=False
    )
    tail = full[len(prompt) :] if full.startswith(prompt) else full
    after = tail[tail.find("Fine.") + len("Fine.") :] if "Fine." in tail else ""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return [i for i in ids if i in special][:1]  # the first one ends the turn; what follows opens the next


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token at which a reply is over: the tokenizer's eos, the model's generation_config eos (a list
    for some models, e.g. Llama-3-Instruct's <|end_of_text|> and <|eot_id|>) and the template's end of turn.
    """
    ids = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return sorted({int(i) for i in ids if i is not None})


def _tensors(row: dict) -> dict:
    """A tokenized row as the collator takes it (without the `cut` flag)."""
    return {k: row[k] for k in ("input_ids", "attention_mask", "labels")}


def collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Right-pads a batch of tokenized rows to its longest row; padded labels are ignored by the loss."""
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)


def label_logits(model, input_ids, attention_mask, keep):
    """Logits (fp32) of the positions where `keep` is true, `keep` being over positions 0..T-2 (position t
    predicts token t+1). Runs the LM head only there: the same numbers as the model's own forward,
    without a vocabulary-sized matmul for every prompt and padding position."""
    while isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module  # a wrapper (Trainer under torchrun, or a user's) runs the same module
    from peft import PeftModel  # here, not at import: tokenize() serves the dry run, which trains nothing

    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # under device_map=auto the decoder's output sits on the last layer's device, the inputs on the first's
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep.to(hidden.device)]).float()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    # Gemma-2 style soft-capping, as its forward does
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def reply_logprobs(
    model,
    tokenizer,
    chats: list[tuple[list[dict], str]],
    max_length: int,
    first_tokens: int | None = None,
    end_of_turn: bool = True,
    batch_size: int = 8,
) -> np.ndarray:
    """Per (messages, reply): [sum of the reply tokens' log-probs, number of scored tokens], shape (n, 2).

    first_tokens: score only the reply's first that many tokens (None: all); end_of_turn: see `tokenize`.
    """
    rows = [
        _tensors(tokenize(tokenizer, messages, reply, max_length, end_of_turn)) for messages, reply in chats
    ]
    for r in rows:
        labelled = [i for i, label in enumerate(r["labels"]) if label != IGNORE]
        # causal: the tokens after the scored ones change nothing, so they are not computed
        if first_tokens and labelled:
            end = labelled[min(first_tokens, len(labelled)) - 1] + 1
            r.update({k: r[k][:end] for k in ("input_ids", "attention_mask", "labels")})
    pad = collator(tokenizer)  # the same batching as training
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = pad(rows[start : start + batch_size]).to(device)
        target = batch["labels"][:, 1:]
        valid = target != IGNORE
        lp = torch.zeros(valid.shape, device=device)
        logits = label_logits(model, batch["input_ids"], batch["attention_mask"], valid)
        scored = torch.log_softmax(logits, dim=-1).gather(-1, target[valid].to(logits.device).unsqueeze(-1))
        lp[valid] = scored.squeeze(-1).to(device)
        out += torch.stack([lp.sum(1), valid.sum(1).float()], dim=1).tolist()
    if was_training:
        model.train()
    return np.asarray(out).reshape(len(rows), 2)


@torch.no_grad()
def token_ranks(
    model, tokenizer, prompts: list[list[int]], replies: list[list[int]], batch_size: int = 8
) -> list:
    """Teacher-forced on each reply's token ids after its prompt's: per reply token, (its log-prob gap below
    the model's most likely token there, its rank among the model's tokens: 0 = the greedy choice)."""
    rows = [
        {"input_ids": p + r, "attention_mask": [1] * (len(p) + len(r)), "labels": [IGNORE] * len(p) + r}
        for p, r in zip(prompts, replies)
    ]
    pad = collator(tokenizer)  # the same batching as training and reply_logprobs
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = pad(rows[start : start + batch_size]).to(device)
        target = batch["labels"][:, 1:]
        keep = target != IGNORE
        lp = torch.log_softmax(label_logits(model, batch["input_ids"], batch["attention_mask"], keep), dim=-1)
        chosen = lp.gather(-1, target[keep].to(lp.device).unsqueeze(-1))
        gaps, ranks = (lp.max(-1).values - chosen.squeeze(-1)).tolist(), (lp > chosen).sum(-1).tolist()
        for n in keep.sum(1).tolist():
            out.append(list(zip(gaps[:n], ranks[:n])))
            gaps, ranks = gaps[n:], ranks[n:]
    if was_training:
        model.train()
    return out


def decoding(cfg, stop: list[int], pad_token_id: int | None):
    """The generation config an evaluation decodes with, built from `cfg` (eval) alone: every field at
    transformers' neutral value unless the config sets it (no repetition penalty, n-gram ban, minimum length,
    suppressed tokens or top-k from the checkpoint's generation_config.json)."""
    from transformers import GenerationConfig

    sample = cfg.temperature > 0
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        temperature=cfg.temperature if sample else 1.0,
        top_p=cfg.top_p if sample else 1.0,
        # off when sampling (None would take transformers' default, 50); unset when greedy, which reads no
        # top-k (a set one only draws transformers' "flag not valid" warning)
        top_k=0 if sample else None,
        num_return_sequences=cfg.samples_per_prompt,
        pad_token_id=pad_token_id,
        eos_token_id=stop,
    )


class _OwnDecoding:
    """Within it, the model's generation_config is neutral: generate() fills every field an explicit config
    leaves at transformers' default from the model's own (its checkpoint's), so it has to be swapped out."""

    def __init__(self, model, config):
        from peft import PeftModel

        self.model = model.get_base_model() if isinstance(model, PeftModel) else model
        self.config = config

    def __enter__(self):
        self.saved, self.model.generation_config = self.model.generation_config, self.config
        return self

    def __exit__(self, *exc):
        self.model.generation_config = self.saved


@torch.no_grad()
def generate(model, tokenizer, chats: list[list[dict]], cfg) -> list[list[str]]:
    """`cfg.samples_per_prompt` completions per chat; greedy when cfg.temperature == 0, with exactly the
    decoding `cfg` asks for (`decoding`), whatever the checkpoint's generation_config.json says.

    Chats are sorted by length and left-padded in batches, so padding stays small.
    """
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[list[str]] = [[] for _ in texts]
    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = stop_token_ids(model, tokenizer)
    config = decoding(cfg, stop, tokenizer.pad_token_id)
    own = _OwnDecoding(model, config)
    for start in tqdm(range(0, len(order), cfg.batch_size), desc="generate", leave=False):
        idx = order[start : start + cfg.batch_size]
        batch = tokenizer(
            [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        try:
            with own:
                gen = model.generate(**batch, generation_config=config)
        except torch.OutOfMemoryError as e:
            raise OutOfMemory(
                f"out of GPU memory while generating (eval.batch_size={cfg.batch_size}, "
                f"eval.max_new_tokens={cfg.max_new_tokens}); "
                "fix: lower eval.batch_size (a new run identity: on a GPU the batch shape can change "
                "results) or eval.max_new_tokens"
            ) from e
        decoded = tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = [
                d.strip() for d in decoded[j * cfg.samples_per_prompt : (j + 1) * cfg.samples_per_prompt]
            ]
    if was_training:
        model.train()
    return out
