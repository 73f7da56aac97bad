"""Benchmark 11, the prepared GPU check: what a GPU node gives ipsweep, measured in one command that needs
nothing but a copy of the working tree (no weights, no embedded GGUF, no downloads).

Steps, each writing its result to OUT/<step>.json as it finishes (a run cut off still reports what it did):
- env: torch, CUDA, the GPU, the libraries;
- train_<shape>[_checkpointing]: LoRA SFT through ipsweep's own training step (ReplyLossTrainer, the job's
  TrainingArguments: bf16, fused AdamW) on random-init models of Qwen2-1.5B's and Llama-3-8B's shapes
  (benchmarks/shapes/*.json), with and without gradient checkpointing: real tokens/s, MFU (4·N FLOPs per
  token, the useful work of a frozen base; checkpointing's second forward is not counted), peak memory
  beside ipsweep's memory estimate for the same step;
- generate: the 1.5B shape's batched generation (the job's lm.generate path) against one prompt at a time;
- sweep_point: one real sweep point end to end through launch.py (train, evaluate, record) on the 1.5B shape
  with a tokenizer trained here on the setting's text.

  python benchmarks/gpu_check.py --out OUT        # GPU: ~3-5 min on an H100/H200 (make gpu-check)
  python benchmarks/gpu_check.py --tiny --out OUT # CPU: the steps at toy sizes (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from common import LAUNCH, RESULTS, ROOT, Timer, device, device_tag, peak_flops

SHAPES = ROOT / "benchmarks" / "shapes"
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}


def shape(name: str, tiny: bool) -> dict:
    config = {k: v for k, v in json.loads((SHAPES / f"{name}.json").read_text()).items() if k[0] != "_"}
    if tiny:
        config.update(TINY, num_key_value_heads=2, vocab_size=1024)
    return config


def random_model(config: dict, dtype):
    """A model of `config`'s shape with random weights, built on the device it will run on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(where):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def step_env(a) -> dict:
    import peft
    import transformers

    return {
        "device": device(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "peak_bf16_flops": peak_flops(),
    }


def step_train(a, name: str, checkpointing: bool) -> dict:
    """LoRA SFT steps through ipsweep's trainer on synthetic rows: 40% prompt, 60% reply (labelled)."""
    import dataclasses

    from common import compose, sync
    from transformers import default_data_collator  # rows of one length: nothing to pad
    from transformers.trainer_callback import PrinterCallback

    from ipsweep import memory
    from ipsweep.train import ReplyLossTrainer, _args, _Watch, add_lora

    config = shape(name, a.tiny)
    length, batch = (64, 4) if a.tiny else (a.length, a.batch_size)
    cfg = compose(
        f"train.batch_size={batch}",
        f"train.max_length={length}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        "train.warmup_steps=0",
    )
    model = random_model(config, dtype())
    n_params = sum(p.numel() for p in model.parameters())
    model = add_lora(model, cfg.train.lora, 0)
    generator = torch.Generator().manual_seed(0)
    steps = a.steps + 2  # the first two are a warm-up, not timed
    rows = []
    for _ in range(steps * batch):
        ids = torch.randint(0, config["vocab_size"], (length,), generator=generator).tolist()
        prompt = int(0.4 * length)
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]}
        )

    class Clock(_Watch):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                sync()
                self.start = time.perf_counter()

    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    args = dataclasses.replace(
        _args(cfg.train, Path(a.out) / "trainer", 1, device_kind, dtype=model.dtype), save_strategy="no"
    )
    clock = Clock()
    trainer = ReplyLossTrainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator, callbacks=[clock]
    )
    trainer.remove_callback(PrinterCallback)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    sync()
    seconds = time.perf_counter() - clock.start
    tokens = a.steps * batch * length
    out = {
        "shape": name,
        "parameters": n_params,
        "gradient_checkpointing": checkpointing,
        "micro_batch": batch,
        "length": length,
        "timed_steps": a.steps,
        "tokens_per_s": tokens / seconds,
        "loss_first": clock.losses[0],
        "loss_last": clock.losses[-1],
    }
    if peak_flops():
        out["mfu"] = 4 * n_params * tokens / seconds / peak_flops()
    estimate = memory.estimate(
        memory.shape({**config}, cfg.train.lora),
        cfg,
        "bf16" if torch.cuda.is_available() else "fp32",
        memory.Rows.of([(len(r["input_ids"]), sum(x != -100 for x in r["labels"])) for r in rows]),
    )
    # what torch allocates, beside the estimate less its allowance for the CUDA context and slack
    out["estimated_gb"] = estimate.training / 1e9 - memory.OVERHEAD_GB
    if torch.cuda.is_available():
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["measured_over_estimate"] = out["peak_gb"] / out["estimated_gb"]
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def step_generate(a) -> dict:
    """Greedy generation of a fixed number of tokens per prompt: batched, and one prompt at a time."""
    config = shape("qwen2-1.5b", a.tiny)
    model = random_model(config, dtype()).eval()
    n, prompt_len, new = (8, 16, 8) if a.tiny else (a.gen_prompts, 64, 128)
    where = next(model.parameters()).device
    ids = torch.randint(0, config["vocab_size"], (n, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(where)

    def run(batch):
        with torch.no_grad():
            model.generate(batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    run(ids[:1])  # warm-up
    with Timer() as batched:
        run(ids)
    one = min(n, 4 if a.tiny else 8)
    with Timer() as single:
        for i in range(one):
            run(ids[i : i + 1])
    batched_rate, single_rate = n * new / batched.s, one * new / single.s
    return {
        "prompts": n,
        "new_tokens": new,
        "batched_tokens_per_s": batched_rate,
        "one_at_a_time_tokens_per_s": single_rate,
        "speedup": batched_rate / single_rate,
    }


def chat_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with ChatML turns: a chat model's tokenizer with no
    download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special))
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    out.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return out


def step_sweep_point(a) -> dict:
    """One point through launch.py, as a user runs it, on a model folder made here."""
    import subprocess

    from common import compose

    from ipsweep.settings.base import build

    folder = Path(a.out) / "model"
    setting = build(compose("setting=trait_pair").setting)
    texts = [m["content"] for e in setting.train_examples() for m in e.messages] + [
        e.completion for e in setting.train_examples()
    ]
    tokenizer = chat_tokenizer(texts, 1024 if a.tiny else 8192)
    config = {**shape("qwen2-1.5b", a.tiny), "vocab_size": len(tokenizer)}
    config.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = random_model(config, dtype())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    sweep = Path(a.out) / "sweep"
    cmd = [
        *LAUNCH,
        "model=hf",
        f"model.path={folder}",
        "model.name=gpu-check-qwen2-1.5b-shape",
        "setting=trait_pair",
        "prompt=caps_strong",
        "train.n_train=16" if a.tiny else "train.n_train=256",
        "eval.n_eval=8" if a.tiny else "eval.n_eval=60",
        "eval.max_new_tokens=8" if a.tiny else "eval.max_new_tokens=64",
        "train.epochs=1",
        "logger=none",
        "elicit.estimators=[logprob]",
        f"elicit.cache_dir={Path(a.out) / 'elicit'}",
        f"hydra.run.dir={sweep}",
        f"store_dir={sweep}",
    ]
    with Timer() as t:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (record,) = [json.loads(p.read_text()) for p in sweep.glob("runs/*/record.json")] or [{}]
    epoch = record.get("epochs", {}).get("1", {})
    return {
        "exit": proc.returncode,
        "wall_s": t.s,
        "status": record.get("status"),
        "device": record.get("config", {}).get("inputs", {}).get("device"),
        "dtype": record.get("config", {}).get("inputs", {}).get("dtype"),
        "train_s": epoch.get("train_s"),
        "eval_s": epoch.get("eval_s"),
        "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/ipsweep-gpu-check")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, for the CPU (the test suite runs this)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per arm")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gen-prompts", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="run only these steps")
    a = ap.parse_args()
    if a.tiny:
        a.steps = 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {
        "env": lambda: step_env(a),
        "train_qwen2-1.5b": lambda: step_train(a, "qwen2-1.5b", False),
        "train_qwen2-1.5b_checkpointing": lambda: step_train(a, "qwen2-1.5b", True),
        "train_llama-3-8b": lambda: step_train(a, "llama-3-8b", False),
        "train_llama-3-8b_checkpointing": lambda: step_train(a, "llama-3-8b", True),
        "generate": lambda: step_generate(a),
        "sweep_point": lambda: step_sweep_point(a),
    }
    results = []
    for name, step in steps.items():
        if a.only and name not in a.only:
            continue
        start = time.perf_counter()
        try:
            result = {"step": name, "ok": True, **step()}
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the others' results
            result = {
                "step": name,
                "ok": False,
                "error": repr(e),
                "traceback": traceback.format_exc()[-3000:],
            }
        result["step_s"] = time.perf_counter() - start
        result["command"] = "python " + " ".join(sys.argv)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        shown = {k: v for k, v in result.items() if k not in ("traceback", "command", "stderr_tail")}
        print(json.dumps(shown, default=str), flush=True)
        results.append(shown)
    # all steps in one file, as the other benchmarks keep theirs (BENCHMARKS.md quotes it)
    RESULTS.mkdir(parents=True, exist_ok=True)
    kept = RESULTS / f"gpu_check{'-tiny' if a.tiny else ''}-{device_tag()}.json"
    kept.write_text(
        json.dumps({"command": "python " + " ".join(sys.argv), "steps": results}, indent=1) + "\n"
    )
    print(f"written: {kept}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
