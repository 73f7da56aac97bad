"""Benchmark 9: the evaluation engines side by side on the same adapters and prompts: HF `generate` with
the adapter unmerged (eval.engine=hf), HF with the adapter merged into the weights, and vLLM serving every
adapter from one engine (eval.engine=vllm), greedy.

Each arm generates for the untrained model and for each of --adapters rank-8 adapters (LoRA B drawn at
random, so every adapter changes the replies) with the batched code path ipsweep evaluates with. Replies are
compared text for text with the HF-unmerged arm's. vLLM runs in its own process (ipsweep.engine, as a job
runs it); its engine start-up is reported apart from its generation time.

  python benchmarks/eval_engines.py          # CPU: SmolLM2-135M, vLLM from .venv-vllm (make vllm)
  # GPU (a random-init model of Qwen2-1.5B's shape, no weights needed; vLLM in the job's environment):
  python benchmarks/eval_engines.py --shape 1.5b --n 256 --max-new-tokens 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import MODEL_HELP, ROOT, Timer, compose, device, model_overrides, save

from ipsweep import engine, lm, models
from ipsweep.settings.base import build

# Qwen2-1.5B's shape with SmolLM2's tokenizer: what the GPU benchmark measures, from random weights
SHAPES = {
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    )
}


def random_model(shape: str, folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.prepare_embedded())
    model = models.random_llama(tokenizer, max_position_embeddings=4096, **SHAPES[shape])
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_adapters(cfg, n: int, folder: Path) -> list[str]:
    """`n` LoRA adapters of the run's LoRA config with B drawn at random (an untrained adapter has B = 0)."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(n):
        base, _ = models.load(cfg.model)
        lora = cfg.train.lora
        peft = get_peft_model(
            base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules))
        )
        torch.manual_seed(100 + i)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        paths.append(str(folder / f"adapter{i}"))
        peft.save_pretrained(paths[-1])
    return paths


def hf_arm(cfg, chats, adapters: list[str | None], merged: bool) -> tuple[float, dict]:
    from peft import PeftModel

    base, tokenizer = models.load(cfg.model)
    base.eval()
    lm.generate(base, tokenizer, chats[:2], cfg.eval)  # untimed warm-up
    replies = {}
    with Timer() as t:
        for a in adapters:
            model = PeftModel.from_pretrained(base, a) if a else base
            if a and merged:
                model.merge_adapter()  # the adapter's weights folded in: plain matmuls while generating
            replies[a] = [c[0] for c in lm.generate(model, tokenizer, chats, cfg.eval)]
            if a:
                if merged:
                    model.unmerge_adapter()
                base = model.unload()
    return t.s, replies


def vllm_arm(cfg, chats, adapters, scratch: Path) -> tuple[float, dict, dict, str]:
    model, tokenizer = models.load(cfg.model)
    stop = lm.stop_token_ids(model, tokenizer)
    del model
    folder = engine.model_folder(cfg, scratch / "model")
    requests = [engine.Request(key=str(i), adapter=a, chats=chats) for i, a in enumerate(adapters)]
    with Timer() as t:
        version, texts, _ = engine.generate(cfg, tokenizer, stop, folder, requests, scratch / "engine")
    seconds = json.loads((scratch / "engine" / "output.json").read_text())["seconds"]
    return t.s, {a: [c[0] for c in texts[str(i)]] for i, a in enumerate(adapters)}, seconds, version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help=MODEL_HELP)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random-init model of this shape instead")
    ap.add_argument("--setting", default="trait_pair")
    ap.add_argument("--n", type=int, default=64, help="eval prompts")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32, help="eval.batch_size of the HF arms")
    ap.add_argument("--adapters", type=int, default=2)
    local = ROOT / ".venv-vllm" / "bin" / "python"  # what `make vllm` builds
    ap.add_argument(
        "--vllm-python",
        default=str(local) if local.is_file() else None,
        help="an interpreter with vllm (default: .venv-vllm's if there, else this one)",
    )
    a = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="eval-engines-"))
    model = [*model_overrides(a.model)]
    if a.shape:
        random_model(a.shape, scratch / "shape")
        model = ["model=hf", f"model.path={scratch / 'shape'}", f"model.name=random-{a.shape}"]
    cfg = compose(
        *model,
        f"setting={a.setting}",
        f"eval.max_new_tokens={a.max_new_tokens}",
        f"eval.batch_size={a.batch_size}",
        "eval.engine=vllm",
        *([f"eval.vllm.python={a.vllm_python}"] if a.vllm_python else []),
    )
    chats = [ex.messages for ex in build(cfg.setting).eval_examples()][: a.n]
    adapters = [None, *make_adapters(cfg, a.adapters, scratch)]
    _, tokenizer = models.load(cfg.model)

    unmerged_s, reference = hf_arm(cfg, chats, adapters, merged=False)
    merged_s, merged = hf_arm(cfg, chats, adapters, merged=True)
    vllm_s, vllm, seconds, version = vllm_arm(cfg, chats, adapters, scratch)
    vllm_gen_s = sum(s for k, s in seconds.items() if k != "startup")

    def tokens(replies: dict) -> int:
        return sum(
            len(tokenizer(r, add_special_tokens=False)["input_ids"]) for rs in replies.values() for r in rs
        )

    def same(replies: dict) -> str:
        agree = sum(x == y for p in adapters for x, y in zip(reference[p], replies[p]))
        return f"{agree}/{len(chats) * len(adapters)}"

    changed = [sum(x != y for x, y in zip(reference[None], reference[p])) for p in adapters[1:]]
    passes = len(adapters)
    rows = [
        {
            "arm": "HF generate, adapter unmerged (eval.engine=hf)",
            "seconds": unmerged_s,
            "same_as_unmerged": same(reference),
        },
        {"arm": "HF generate, adapter merged", "seconds": merged_s, "same_as_unmerged": same(merged)},
        {"arm": f"vLLM {version}, generation only", "seconds": vllm_gen_s, "same_as_unmerged": same(vllm)},
        {
            "arm": f"vLLM {version}, with engine start-up (eval.engine=vllm)",
            "seconds": vllm_s,
            "same_as_unmerged": same(vllm),
        },
    ]
    for r, replies in zip(rows, (reference, merged, vllm, vllm)):
        r["new_tokens_per_s"] = tokens(replies) / r["seconds"]
        r["speedup_vs_unmerged"] = unmerged_s / r["seconds"]
    save(
        "eval_engines",
        rows,
        model=cfg.model.name,
        setting=a.setting,
        n=len(chats),
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        passes=f"{passes} (the untrained model and {passes - 1} adapters)",
        adapters_changed_replies=changed,
        vllm_startup_s=seconds["startup"],
        vllm_seconds=seconds,
        torch_threads=torch.get_num_threads(),
        on=device(),
    )


if __name__ == "__main__":
    main()
