"""Structured-config schema, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `config_schema` first in its defaults, so every composed config is checked
against these dataclasses: a misspelt key or a wrong type fails at compose time, before any job runs.
Each group's YAML may only set the keys declared here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# The values each choice key takes (validate checks them, before any job starts).
PLACEMENTS = ("system", "user_prefix", "user_suffix", "replace_preamble")
ROLES = ("inoculation", "neutral", "placebo", "safety")
PROMPT_MODES = ("fixed", "mixed")
METHODS = ("lora", "full")  # train.method
SAMPLINGS = ("group_by_length", "random")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("4bit",)  # model.quantization (null: none)
# model.attn_implementation (null: transformers' default, sdpa where the model supports it)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class SettingConfig:
    _target_: str = MISSING  # the Setting class, e.g. ipsweep.settings.trait_pair.TraitPair
    name: str = MISSING
    placement: str = "user_suffix"  # default placement of the library's prompts
    joiner: str = " "  # between the user text and a prefix/suffix prompt
    # name -> {text, role (one of ROLES), placement (one of PLACEMENTS; default: the setting's)}.
    # Untyped so that `+setting.prompts.x={text: ..., role: ...}` works on the command line;
    # ipsweep.prompts.library validates every entry.
    prompts: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Setting class
    # train.max_length's default for this setting: long enough that its training replies stay whole (with the
    # longest library prompt, on the default model's tokenizer; tests/test_train.py checks each setting)
    max_length: int = 256
    # the share of training examples that show the undesired behaviour; the rest get the setting's clean reply
    # to the same input (Setting.clean_reply), which examples drawn with train.seed. Enters the signature
    # when below 1.
    flawed_share: float = 1.0


@dataclass
class ModelConfig:
    _target_: str = MISSING  # a ModelSource in ipsweep.models (or your own module)
    name: str = MISSING
    path: str | None = None
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16
    # auto (cuda where the job sees a GPU, else cpu) | cpu | cuda; the kind enters the signature
    device: str = "auto"
    # 4bit: QLoRA (bitsandbytes NF4 with double quantization, LoRA on top; `pip install ipsweep[qlora]`).
    # Enters the signature when set.
    quantization: str | None = None
    # the attention kernel (one of ATTN_IMPLEMENTATIONS); null: transformers' default. Enters the signature
    # when set (kernels round differently in bf16).
    attn_implementation: str | None = None
    # null: the whole model on the job's one device, loaded straight onto it; auto: spread over every GPU the
    # job sees (accelerate), for a model larger than one GPU. Placement only: not in the signature.
    device_map: str | None = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False


@dataclass
class TrainConfig:
    epochs: int = 2
    seed: int = 0
    lr: float = 5e-4
    batch_size: int = 8
    grad_accum: int = 1
    # Warm-up then constant: epoch k of an N-epoch run must equal a k-epoch run (the epochs axis),
    # which a schedule that depends on N would break.
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    n_train: int | None = None  # first n examples after the seeded shuffle; None = all
    # random: plain shuffle. group_by_length: batches of similar length (HF's LengthGroupedSampler), less
    # padding and faster, but it changes the training (BENCHMARKS.md #1), so it is opt-in.
    sampling: str = "random"
    # fixed: the IP's one text in every training example; mixed: per example, a seeded draw from its
    # paraphrases (library `texts`/`texts_file`; the last one is held out for the leak test)
    prompt_mode: str = "fixed"
    # mixed only: draw from the first K texts of the prompt's bank (its text, then its paraphrases; never the
    # held-out one); null: all. The record counts the distinct texts the examples got. Enters the signature
    # through the texts.
    paraphrases: int | None = None
    gradient_checkpointing: bool = False  # less GPU memory, ~30% slower; does not change the numbers
    # Training rows longer than max_length lose the end of their reply (and the end-of-turn token the model
    # learns to stop at). Each run records how many were cut and warns; above this share it fails before
    # training.
    max_cut_share: float = 0.01
    # torch's deterministic algorithms (CUDA: slower); see docs/cluster.md, "What is bit-exact"
    deterministic: bool = False
    # also checkpoint every this many optimizer steps inside an epoch (null: at epoch ends only), so a
    # preempted or requeued job resumes mid-epoch, to the same result; not in the signature
    save_steps: int | None = None
    # fp32 compute on a GPU in TF32 (faster matmuls, ~1e-3 relative error); enters the signature when true
    tf32: bool = False
    # lora: LoRA adapters (train.lora) on the frozen model; full: every weight trained, as fp32 master weights
    # (small models: 16 bytes per parameter with gradients and AdamW's moments; a whole model saved per
    # epoch). Enters the signature when full (train.lora then leaves it).
    method: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)


# Evaluation engines (eval.engine): HF transformers generate, or one vLLM engine process per job.
ENGINES = ("hf", "vllm")
# The LoRA ranks vLLM's engine takes as max_lora_rank (vllm.config.lora); a smaller adapter is padded.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VllmConfig:
    """How the vLLM engine runs (eval.engine=vllm); none of it changes a number, so none of it enters the
    signature (the engine itself does)."""

    python: str | None = None  # interpreter that has vllm (its own venv); None = the job's own
    gpu_memory_utilization: float = 0.85  # on a GPU: the share of its memory vLLM takes (weights + KV cache)
    # on CPU: the KV cache, in GiB (vLLM's own CPU default takes 85% of the machine's RAM, and the job and
    # anything else on the machine are then killed for memory)
    cpu_kv_cache_gb: float = 2.0
    max_lora_rank: int | None = None  # one of VLLM_LORA_RANKS; None = the smallest >= train.lora.r
    # The adapter gate, before any score is kept: on the first gate_prompts eval chats, HF+peft teacher-forced
    # on vLLM's greedy reply (its first gate_tokens tokens) must rank each token among its gate_top_k most
    # likely, within gate_max_gap nats of its own choice, on at least min_agreement of them (engines in
    # different dtypes part after near-ties, so equal text is not asked for); and the adapter must change
    # vLLM's output versus the base model.
    gate_prompts: int = 8
    gate_tokens: int = 64
    gate_top_k: int = 5
    gate_max_gap: float = 0.5
    min_agreement: float = 0.75
    timeout_s: int = 7200  # the engine process is stopped and the run recorded failed after this


@dataclass
class EvalConfig:
    n_eval: int | None = None  # per eval set; None = all
    engine: str = "hf"  # hf | vllm (see VllmConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    max_new_tokens: int = 30
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    samples_per_prompt: int = 1
    seed: int = 0  # sampling seed, fixed across runs so conditions see the same draws
    batch_size: int = 32
    # Extra prompts inserted at test time on every trained model (names from the library).
    extra_test_prompts: list[str] = field(default_factory=list)
    # Also test each trained model with its own training prompt and the library's safety prompts inserted
    # (does the behaviour come back on request? does the model still follow instructions?).
    test_grid: bool = False
    # Also test every trained model with prompts resembling an IP's training prompt: its negation, its
    # keywords, a paraphrase held out from training (from the library entry). A control is tested with those
    # of every library prompt that has them, so each leak has its baseline.
    leak_tests: bool = False
    base: bool = True  # also evaluate the untrained model (epoch 0); cached per machine with the elicitation


# Elicitation estimators by name (implemented in elicit.py); kept here so config checks and the analysis
# need not import the model code.
ESTIMATORS = ("sampled", "logprob", "logprob_train")


@dataclass
class ElicitConfig:
    estimators: list[str] = field(default_factory=lambda: ["sampled", "logprob"])
    logprob_items: int = 64  # contrast pairs scored by logprob (training replies for logprob_train)
    logprob_tokens: int | None = 16  # logprob_train only: first reply tokens scored; None = whole reply
    samples: int = 1  # sampled: completions per eval item
    temperature: float = 0.0  # sampled: 0 = greedy (then samples must be 1)
    cache_dir: str | None = None  # None = <user cache>/ipsweep/elicitation, shared by all sweeps


# The correlation table's prompt subsets, by the name a primary test uses for them.
SUBSETS = {"ip_style": "IP-style prompts", "inoculation": "inoculation prompts"}
STATISTICS = ("spearman", "pearson")
ALTERNATIVES = ("greater", "less", "two-sided")  # of the declared statistic against 0


@dataclass
class PrimaryTest:
    """The one correlation test a sweep declares before its runs (`primary.estimator=...` or a preset's
    `primary:`): the report puts it first and calls every other correlation exploratory. Not part of a
    run's identity."""

    estimator: str | None = None  # one of ESTIMATORS; None: no primary test declared
    prompts: str = "ip_style"  # a key of SUBSETS
    statistic: str = "spearman"  # one of STATISTICS
    epoch: int = 1
    # the success criterion, declared with the test: the direction (one of ALTERNATIVES) and the level
    alternative: str = "two-sided"
    alpha: float = 0.05
    # an `ipsweep screen` table (elicitation.csv) whose estimates are the prediction: copied into the sweep
    # dir and hashed when declared, so the analysis can tell whether the prediction preceded the training
    screen: str | None = None
    # a prediction launches only from a clean git tree that holds its screen table (the manifest records the
    # commit); false: run it unattested, as every table that shows it then says
    attest: bool = True


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "ipsweep"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    samples_per_epoch: int = 30  # rows of the eval-sample table logged per epoch
    # mode=online but the W&B server cannot be reached (checked in 3 s, before the sweep and in each job):
    # offline = log offline with one warning (upload later with `ipsweep sync`); fail = stop before any job.
    on_no_network: str = "offline"


@dataclass
class Config:
    setting: SettingConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    elicit: ElicitConfig = MISSING
    logger: LoggerConfig = MISSING
    prompt: str = "none"  # a name from the setting's prompt library; 'none' = the control condition
    prompt_placement: str | None = None  # where the prompt goes (one of PLACEMENTS); None = the library's
    name: str = MISSING  # sweep name: outputs go to outputs/<name>, W&B group = name
    store_dir: str = MISSING  # where run records live (the sweep dir)
    primary: PrimaryTest = field(default_factory=PrimaryTest)  # the declared primary test, if any
    # paired contrasts of arms the analysis computes besides its default comparisons, e.g. a 2x2's
    # interaction "ip:a - ip:b - ip:c + ip:d" (ipsweep/analysis/comparisons.py); kept in the manifest
    compare: list[str] = field(default_factory=list)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [
        ("setting", SettingConfig),
        ("model", ModelConfig),
        ("train", TrainConfig),
        ("eval", EvalConfig),
        ("elicit", ElicitConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)
