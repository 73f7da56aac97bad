"""Result records: one JSON file per run, keyed by the run's signature, written atomically.

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

import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from omegaconf import OmegaConf
from pydantic import ValidationError

from ipsweep import models
from ipsweep.record import Record

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
    files and of the model's weights (store.inputs), so edited data or weights make a new run."""
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


def code_version() -> dict:
    """ipsweep's version and, when it runs from a git checkout, the commit (with -dirty for uncommitted
    changes)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        out = {"ipsweep": version("ipsweep")}
    except PackageNotFoundError:  # run from a checkout on the path, not installed (a bare GPU image)
        out = {"ipsweep": "not installed"}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            out["commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def atomic_write_json(path: Path, data) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    # mkstemp makes it 0600; results are as readable as any file the user writes
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path):
    """A JSON file (cache entry, manifest) that does not parse is treated as absent, never as a result."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, RecursionError):
        return None


class DamagedRecord(Exception):
    """A run record that exists but does not parse or lacks what every record has."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _read_record(path: Path) -> tuple[Record, dict] | None:
    """The record at `path`, typed and as parsed JSON (checked once, for both readers); None if there is
    none; DamagedRecord if it does not parse or lacks what every record has."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DamagedRecord(path, f"not valid JSON ({e})") from None
    try:
        return Record.model_validate(data), data
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise DamagedRecord(path, f"not a run record ({problems})") from None


def load_record(path: Path) -> Record | None:
    """The typed record at `path` (a job's and `ipsweep status`'s view); see _read_record."""
    read = _read_record(path)
    return read and read[0]


class Run:
    """The folder of one run (record.json, checkpoints/, samples/, wandb/) or of one cached evaluation."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.record_path = self.dir / "record.json"

    @contextmanager
    def lock(self):
        """Jobs that share a signature (e.g. train.epochs=1,2) take turns; the later one reuses the earlier's
        epochs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dir / ".lock")):
            yield

    def is_locked(self) -> bool:
        """True while a job works on this run (the lock dies with its process, even on kill -9)."""
        from filelock import Timeout

        try:
            with FileLock(str(self.dir / ".lock"), timeout=0):
                return False
        except Timeout:
            return True

    def load(self) -> Record | None:
        """The record, None if there is none yet; raises DamagedRecord if it is damaged."""
        return load_record(self.record_path)

    def set_aside(self) -> Path:
        """Move a damaged record out of the way (kept, never overwritten); returns where it went."""
        dest = self.record_path.with_name(f"record.damaged-{time.strftime('%Y%m%dT%H%M%S')}.json")
        os.replace(self.record_path, dest)
        return dest

    def save(self, record: Record) -> None:
        record.updated = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.record_path, record.dump())

    def write_samples(self, epoch: int, test_prompt: str, samples: list[dict]) -> Path:
        path = self.dir / "samples" / f"epoch{epoch}_{test_prompt}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
        os.replace(tmp, path)
        return path


def scan(store_dir: str | Path) -> tuple[list[dict], list[DamagedRecord]]:
    """Every run record under a sweep dir, as checked JSON (the analysis works on its tables), and the
    damaged ones."""
    good, damaged = [], []
    for p in sorted(Path(store_dir).glob("runs/*/record.json")):
        try:
            good.append(_read_record(p)[1])
        except DamagedRecord as e:
            damaged.append(e)
    return good, damaged


def records(store_dir: str | Path) -> list[dict]:
    """Every valid run record under a sweep dir (damaged ones: see scan)."""
    return scan(store_dir)[0]


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "runs").is_dir()
