"""A run's identity: the signature that names its folder and keys its record (store.py keeps the record).

The signature hashes the *semantic* config: everything that can change a number, nothing that
cannot. Excluded, by this reviewed list: the logger, the sweep name and paths, gradient checkpointing (it
changes memory, not numbers), mid-epoch checkpoints (train.save_steps: a resumed run ends the same),
train.max_cut_share (a check) and setting.max_length (it enters as train.max_length), model.device and
model.dtype as written (they enter resolved, with the inputs: `auto` on a CPU is cpu and fp32; so do
model.quantization and model.attn_implementation, where set), model.device_map (where the layers sit, not
what they compute), the rest of the prompt library (only the
run's own *training* prompt enters, by its text, placement and, when mixed, its paraphrases; so
`train.prompt_mode`, `train.paraphrases` and `prompt_placement` enter through it), the
test-time prompts and leak tests
(a run is a trained model; each evaluation under a test prompt is added to its record when first
asked for, so a PTST point reuses the control's training), and `train.epochs`, so that the longest
run of a sweep serves the shorter ones.
setting.flawed_share and train.method enter only away from their defaults (DEFAULTS), and a full
fine-tune's identity has no train.lora.
Changing what enters the signature is a versioned change: bump SIGNATURE_VERSION.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from ipsweep import models
from ipsweep.cache import digest

# 2: train.sampling enters the signature.
# 3: per-item outcomes in every evaluation; test prompts leave the signature (PTST reuses the control's run);
#    the content of the data files and model weights enters it.
# 4: `logprob` elicitation is contrastive (behaviour reply vs matched reply, reply tokens only); `sampled` has
#    its own decoding (elicit.samples, elicit.temperature); a reply's end-of-turn tokens are tokenised apart
#    from it.
# 5: scorers follow the authors' rules (gcd detectors and number extraction; toxic_persuasion pair
#    selection); code is scored per test on a CPU-time budget with a `timeout` outcome that is never a reward
#    hack.
# 6: the device kind and resolved dtype enter (a CPU fp32 run and a GPU bf16 run are different runs), and so
#    does eval.batch_size (batch shape changes bf16 logits on a GPU); generation stops at every end-of-turn
#    token, not only the tokenizer's eos; each setting has its own train.max_length default that keeps its
#    training replies whole; code tests end once the value is in, and a test whose processes use no CPU for
#    test_idle_s is a timeout.
# 7: HF evaluations decode with the eval config only (nothing from the checkpoint's generation_config.json);
#    vLLM samples each item with a seed of its own; training computes its loss under the run dtype's autocast
#    (bf16/fp16 models; fp16 with a loss scaler); train.tf32 enters when true.
SIGNATURE_VERSION = 7
# Research axes that enter a run's identity only away from their default, so runs made before the axis existed
# keep their signatures: the share of flawed training examples, the update method (full fine-tuning has no
# LoRA config: train.lora leaves it).
DEFAULTS = {"setting.flawed_share": 1.0, "train.method": "lora", "train.tf32": False}
# prompt_mode and prompt_placement enter through the training prompt (below), so a control, which has none,
# is the same run in every mode and placement of a sweep.
EXCLUDED = (
    "logger",
    "primary",
    "compare",
    "name",
    "store_dir",
    "prompt",
    "prompt_placement",
    "train.epochs",
    "train.gradient_checkpointing",
    "train.save_steps",
    "train.prompt_mode",
    "train.paraphrases",
    "train.max_cut_share",
    "setting.max_length",
    *(f"model.{k}" for k in models.RESOLVED),
    "setting.prompts",
    "eval.extra_test_prompts",
    "eval.test_grid",
    "eval.leak_tests",
)


def without(data: dict, *keys: str) -> dict:
    """A deep copy of `data` without the dotted `keys` (e.g. "train.seed"); keys that are absent are
    ignored."""
    out = json.loads(json.dumps(data))
    for key in keys:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return out


def semantic_config(cfg, train_prompt, inputs: dict | None = None) -> dict:
    """What determines a run's trained models and their evaluations: `train_prompt` is the prompt inserted
    in training (NO_PROMPT for the control and PTST); `inputs` the content digests of the setting's data
    files and of the model's weights (`inputs` below), so edited data or weights make a new run."""
    data = without(OmegaConf.to_container(cfg, resolve=True), *EXCLUDED)
    data = without(data, *(k for k, v in DEFAULTS.items() if OmegaConf.select(cfg, k, default=v) == v))
    if data["train"].get("method") == "full":
        del data["train"]["lora"]
    data["eval"] = eval_identity(data["eval"])
    p = train_prompt
    data["prompt"] = {"name": p.name, "text": p.text, "role": p.role, "placement": p.placement}
    if p.mode == "mixed":
        data["prompt"].update(mode=p.mode, texts=list(p.training_texts))
    data["inputs"] = inputs or {}
    data["signature_version"] = SIGNATURE_VERSION
    return data


def eval_identity(eval_cfg: dict) -> dict:
    """The part of the eval config that can change a number. The engine enters (vLLM's outputs may differ
    from HF's) unless it is the default, so runs made before engines existed keep their signatures; how the
    vLLM engine runs (eval.vllm: interpreter, memory share, the gate's thresholds) changes none."""
    out = {k: v for k, v in eval_cfg.items() if k != "vllm"}
    if out.get("engine") == "hf":
        del out["engine"]
    return out


def inputs(cfg, setting) -> dict:
    """What a run reads or runs on besides its config: the content digests of the setting's data files and of
    the model's weights, and the device kind and resolved dtype (models.numerics)."""
    return {
        "data": setting.data_digests,
        "model_weights": models.weights_digest(cfg.model),
        **models.numerics(cfg.model),
    }


def signature(cfg, train_prompt, inputs: dict | None = None) -> str:
    """The run's signature: the digest of its semantic config (the run folder's and record's key)."""
    return digest(semantic_config(cfg, train_prompt, inputs))
