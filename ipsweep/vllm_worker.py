"""The vLLM engine process: `python vllm_worker.py REQUEST.json OUTPUT.json`.

One engine serves the base model and every LoRA adapter of a run. It imports nothing from ipsweep, so it
runs under any interpreter that has vLLM (vLLM's pins may need their own environment; eval.vllm.python).
It runs in its own process because vLLM has no shutdown: when it exits, its memory is released.

The job (ipsweep.engine) tokenizes the chats and decodes the tokens with the run's own tokenizer, so both
engines see the same prompt tokens and the same text is scored; this process only generates token ids.
Request: {"model", "dtype", "seed", "max_lora_rank", "max_model_len", "gpu_memory_utilization",
"kv_cache_memory_bytes" (null: vLLM sizes it),
"jobs": [{"key", "adapter" (path or null), "prompt_token_ids", "n", "temperature", "top_p", "max_tokens",
"stop_token_ids", "seeds" (one per prompt), "logprobs"}]}.
Output: {"vllm": version, "seconds": {"startup", key...},
"outputs": {key: per prompt, per sample {"token_ids", "logprob"}}}, written only when every job is done.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _sampling(job: dict) -> list:
    """One SamplingParams per prompt, each with its prompt's own seed: with one seed for all, every prompt
    would draw the same noise at each step and the samples of different items would be correlated."""
    from vllm import SamplingParams

    return [
        SamplingParams(
            n=job["n"],
            temperature=job["temperature"],
            top_p=job["top_p"],
            max_tokens=job["max_tokens"],
            stop_token_ids=job["stop_token_ids"],
            seed=seed,
            # the sampled tokens' own log-probs: the adapter gate compares them with the base model's
            logprobs=0 if job["logprobs"] else None,
            detokenize=False,  # the job decodes with the run's tokenizer, as it does HF's tokens
        )
        for seed in job["seeds"]
    ]


def _sample(completion) -> dict:
    logprob = None
    if completion.logprobs is not None:
        logprob = sum(step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs))
    return {"token_ids": list(completion.token_ids), "logprob": logprob}


def main(request_path: str, output_path: str) -> None:
    import vllm
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    request = json.loads(open(request_path).read())
    start = time.time()
    llm = LLM(
        model=request["model"],
        dtype=request["dtype"],
        seed=request["seed"],
        enable_lora=True,
        max_lora_rank=request["max_lora_rank"],
        max_loras=1,
        # vLLM's neutral sampling defaults, not the checkpoint's generation_config.json (repetition penalty,
        # top-k...): the job's decoding is exactly what its request says, as in lm.generate
        generation_config="vllm",
        max_model_len=request["max_model_len"],
        gpu_memory_utilization=request["gpu_memory_utilization"],
        kv_cache_memory_bytes=request.get("kv_cache_memory_bytes"),
    )
    seconds = {"startup": time.time() - start}
    print(f"vllm {vllm.__version__}: engine up in {seconds['startup']:.0f} s", file=sys.stderr, flush=True)
    adapter_ids: dict[str, int] = {}
    outputs = {}
    for job in request["jobs"]:
        lora = None
        if job["adapter"]:
            path = job["adapter"]
            adapter_ids.setdefault(path, len(adapter_ids) + 1)
            lora = LoRARequest(f"adapter-{adapter_ids[path]}", adapter_ids[path], path)
        prompts = [{"prompt_token_ids": ids} for ids in job["prompt_token_ids"]]
        t = time.time()
        results = llm.generate(prompts, _sampling(job), lora_request=lora, use_tqdm=False)
        outputs[job["key"]] = [[_sample(c) for c in r.outputs] for r in results]
        seconds[job["key"]] = time.time() - t
        print(
            f"{job['key']}: {len(prompts)} prompts in {seconds[job['key']]:.1f} s, adapter {job['adapter']}",
            file=sys.stderr,
            flush=True,
        )
    tmp = output_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"vllm": vllm.__version__, "seconds": seconds, "outputs": outputs}, f)
    os.replace(tmp, output_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
