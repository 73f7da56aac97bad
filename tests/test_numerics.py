"""The numbers a GPU run computes, proven on the CPU (issue 42): training's loss runs under the run's
autocast, evaluation decodes with exactly the eval config (nothing from the checkpoint's
generation_config.json), sampled vLLM requests draw per item, the vLLM LoRA rank is one vLLM takes, and
the adapter gate compares what two engines in different numerics can agree on."""

from __future__ import annotations

import pytest
import torch

from ipsweep import engine, lm, models, validate
from ipsweep.errors import EngineCheckFailed
from ipsweep.settings.base import TrainExample
from ipsweep.train import dataset, finetune

CHATS = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "Name a colour.", "Say hi.")]


def _autocast_seen(make_cfg, tmp_path, dtype: torch.dtype, *overrides: str) -> set:
    """Train one epoch of a tiny model loaded in `dtype`; the autocast state and output dtype each decoder
    projection saw during the training forward passes (those with gradients)."""
    cfg = make_cfg("train.n_train=8", *overrides)
    model, tok = models.tiny_random("tiny")
    model = model.to(dtype)
    seen = set()

    def hook(module, args, output):
        if torch.is_grad_enabled():
            on = torch.is_autocast_enabled("cpu")
            seen.add((on, torch.get_autocast_dtype("cpu") if on else None, output.dtype))

    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            module.register_forward_hook(hook)
    examples = [
        TrainExample([{"role": "user", "content": f"What is {i} plus 1?"}], f"{i} PLUS 1 IS {i + 1}.")
        for i in range(8)
    ]
    rows, _ = dataset(tok, examples, cfg.train.max_length)
    finetune(model, tok, rows, cfg.train, tmp_path / "run", {}, lambda ep, m: None)
    return seen


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_bf16_run_computes_its_loss_under_bf16_autocast(make_cfg, tmp_path, method):
    """The loss's forward (lm.label_logits, which bypasses PeftModel.forward) runs under the trainer's
    autocast: a bf16 LoRA run, and a full fine-tune whose master weights are fp32, both compute in bf16."""
    seen = _autocast_seen(make_cfg, tmp_path, torch.bfloat16, f"train.method={method}")
    assert seen == {(True, torch.bfloat16, torch.bfloat16)}


def test_an_fp32_run_computes_in_fp32(make_cfg, tmp_path):
    assert _autocast_seen(make_cfg, tmp_path, torch.float32) == {(False, None, torch.float32)}


def test_tf32_applies_to_a_gpus_fp32_compute_only_where_allowed():
    from ipsweep.train import precision

    assert precision(torch.float32, "cuda", tf32=True) == {"bf16": False, "fp16": False, "tf32": True}
    assert precision(torch.float32, "cuda")["tf32"] is False
    assert precision(torch.float16, "cuda") == {"bf16": False, "fp16": True, "tf32": False}
    assert precision(torch.float32, "cpu", tf32=True)["tf32"] is None  # TrainingArguments refuses it on a CPU


def test_numerics_that_cannot_train_are_refused_before_any_job(make_cfg):
    problems = validate._loading_problems(make_cfg("model.dtype=fp16", "model.device=cpu"))
    assert any("without a loss scaler" in p and "model.dtype=bf16" in p for p in problems)
    for overrides in (("model.dtype=fp32",), ("model.dtype=bf16", "train=full")):
        cfg = make_cfg(*overrides, "model.device=cuda", "model.attn_implementation=flash_attention_2")
        assert any("computes in fp16/bf16 only" in p for p in validate._loading_problems(cfg)), overrides
    ok = make_cfg("model.dtype=bf16", "model.device=cuda", "model.attn_implementation=flash_attention_2")
    assert not validate._loading_problems(ok)


def _greedy(model, tok, n=12):
    cfg = make_eval(max_new_tokens=n)
    return lm.generate(model, tok, CHATS, cfg)


def make_eval(**kw):
    from omegaconf import OmegaConf

    base = {
        "max_new_tokens": 12,
        "temperature": 0.0,
        "top_p": 1.0,
        "samples_per_prompt": 1,
        "seed": 0,
        "batch_size": 8,
    }
    return OmegaConf.create({**base, **kw})


def test_evaluation_decodes_as_the_eval_config_says_whatever_the_checkpoint_sets():
    """A checkpoint whose generation_config.json bans repeated bigrams and penalises repetition gives the same
    greedy replies as the same weights without it (and those settings would change them)."""
    model, tok = models.tiny_random("tiny")
    plain = _greedy(model, tok)
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.min_length = 200
    assert _greedy(model, tok) == plain
    # the test can fail: generate() left to itself applies them
    batch = tok(
        tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True), return_tensors="pt"
    )
    own = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = own[0, batch["input_ids"].shape[1] :].tolist()
    assert len(set(reply)) == len(reply), "no token repeats under the checkpoint's no_repeat_ngram_size=1"
    assert model.generation_config.no_repeat_ngram_size == 1, "the model's own config is left as it was"


def test_vllm_items_sample_with_seeds_of_their_own_the_same_under_every_condition(make_cfg):
    seeds = engine.item_seeds(0, 50)
    assert len(set(seeds)) == 50, "no two items share a seed"
    assert engine.item_seeds(0, 50) == seeds, "reproducible"
    assert engine.item_seeds(0, 10) == seeds[:10], "item i's seed does not depend on how many items"
    assert engine.item_seeds(1, 50) != seeds, "eval.seed moves every item's"


def test_the_vllm_lora_rank_is_one_vllm_takes(make_cfg):
    assert engine.lora_rank(make_cfg("train.lora.r=4")) == 8  # the lora_shape preset's rank: padded to 8
    assert engine.lora_rank(make_cfg("train.lora.r=16")) == 16
    assert engine.lora_rank(make_cfg("train.lora.r=4", "eval.vllm.max_lora_rank=64")) == 64
    problems = validate.engine_problems(make_cfg("eval.engine=vllm", "eval.vllm.max_lora_rank=4"))
    assert any("max_lora_rank=4 is not a rank vLLM takes" in p for p in problems)
    problems = validate.engine_problems(make_cfg("eval.engine=vllm", "train.lora.r=600"))
    assert any("train.lora.r=600 is above the largest" in p for p in problems)


def _vllm_output(model, tok, swap=None):
    """What the engine returns for the gate's pass, made here: a greedy reply of 8 tokens per chat; with
    `swap`, the first chat's reply takes at one position the token `swap` picks from the model's ranking
    there (given the logits and the greedy reply so far) and goes on greedily from it, as an engine would."""
    prompts = [
        tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        for c in CHATS
    ]

    def greedy(ids, n):
        return model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[
            0, len(ids) :
        ].tolist()

    replies = [greedy(p, 8) for p in prompts]
    if swap:
        p, reply = prompts[0], replies[0]
        with torch.no_grad():
            logits = [model(torch.tensor([p + reply[:i]])).logits[0, -1] for i in range(8)]
        position, token = swap(logits)
        head = reply[:position] + [token]
        replies[0] = head + (greedy(p + head, 8 - len(head)) if len(head) < 8 else [])
    texts = [[tok.decode(r)] for r in replies]
    firsts = [{"token_ids": r, "logprob": -1.0} for r in replies]
    return {"gate/0": texts}, {"gate/0": firsts}


def _near_tie(logits):
    """The position where the runner-up is closest to the greedy token, and the runner-up."""
    gaps = [float(x.topk(2).values[0] - x.topk(2).values[1]) for x in logits]
    position = min(range(len(gaps)), key=gaps.__getitem__)
    return position, int(logits[position].topk(2).indices[1])


def _far_down(logits):
    return 3, int(logits[3].argsort(descending=True)[200])


def test_the_gate_passes_replies_that_part_after_a_near_tie_and_fails_a_wrong_token(make_cfg):
    """Teacher-forced on vLLM's tokens, HF accepts a reply whose token is its runner-up (a near-tie broken the
    other way, as bf16 kernels do) although the texts differ, and refuses one whose token is far down its
    ranking (a wrong model, dtype or adapter)."""
    cfg = make_cfg("eval.engine=vllm", "eval.vllm.min_agreement=1.0")
    model, tok = models.load(cfg.model)
    model.eval()
    texts, firsts = _vllm_output(model, tok)
    assert engine.gate(cfg, CHATS, texts, firsts, {0: None})[0]["passed"]
    greedy_texts = texts
    texts, firsts = _vllm_output(model, tok, swap=_near_tie)
    assert texts["gate/0"][0] != greedy_texts["gate/0"][0], "the replies differ as text"
    check = engine.gate(cfg, CHATS, texts, firsts, {0: None})[0]
    assert check["passed"] and check["not_hf_greedy"] == 1 and check["agreement"] == 1.0, check
    texts, firsts = _vllm_output(model, tok, swap=_far_down)
    check = engine.gate(cfg, CHATS, texts, firsts, {0: None})[0]
    assert not check["passed"] and check["agreement"] == pytest.approx(2 / 3)
    with pytest.raises(EngineCheckFailed) as error:
        engine.require_passed({0: check})
    assert "gate_top_k" in str(error.value)
