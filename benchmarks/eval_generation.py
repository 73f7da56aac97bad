"""Benchmark 2: batched generation (ipsweep.evaluate.generate) vs one prompt at a time, greedy.

Both arms generate for the same eval prompts of a setting with the same model. The batched arm is the
code path every ipsweep evaluation uses (prompts sorted by length, left-padded batches). Outputs are
compared text for text: greedy decoding should give the same replies (batching can change the last
bits of the floating-point sums, so a rare near-tie may flip; the count is reported).

  python benchmarks/eval_generation.py                       # CPU: 32 trait_pair prompts, 30 new tokens
  python benchmarks/eval_generation.py --n 128 --max-new-tokens 150 --setting gcd_sycophancy   # GPU
"""

from __future__ import annotations

import argparse

import torch
from common import MODEL_HELP, Timer, compose, device, model_overrides, save

from ipsweep import models
from ipsweep.lm import generate
from ipsweep.settings.base import build


@torch.no_grad()
def one_at_a_time(model, tok, chats, max_new_tokens: int) -> list[str]:
    out = []
    dev = next(model.parameters()).device
    for chat in chats:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).to(dev)
        gen = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help=MODEL_HELP)
    ap.add_argument("--setting", default="trait_pair")
    ap.add_argument("--n", type=int, default=32, help="eval prompts")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32, help="eval.batch_size of the batched arm")
    a = ap.parse_args()

    cfg = compose(
        *model_overrides(a.model),
        f"setting={a.setting}",
        f"eval.max_new_tokens={a.max_new_tokens}",
        f"eval.batch_size={a.batch_size}",
    )
    model, tok = models.load(cfg.model)
    model.eval()
    chats = [ex.messages for ex in build(cfg.setting).eval_examples()][: a.n]
    generate(model, tok, chats[:2], cfg.eval)  # untimed warm-up
    with Timer() as single:
        singles = one_at_a_time(model, tok, chats, a.max_new_tokens)
    with Timer() as batched:
        batch = [c[0] for c in generate(model, tok, chats, cfg.eval)]
    same = sum(x == y for x, y in zip(singles, batch))
    rows = [
        {"arm": "one prompt at a time", "seconds": single.s, "prompts_per_s": len(chats) / single.s},
        {
            "arm": f"ipsweep batched (batch {a.batch_size})",
            "seconds": batched.s,
            "prompts_per_s": len(chats) / batched.s,
        },
    ]
    save(
        "eval_generation",
        rows,
        speedup=single.s / batched.s,
        identical_outputs=f"{same}/{len(chats)}",
        model=a.model,
        setting=a.setting,
        n=len(chats),
        max_new_tokens=a.max_new_tokens,
        on=device(),
        differing=[{"single": x, "batched": y} for x, y in zip(singles, batch) if x != y],
    )


if __name__ == "__main__":
    main()
