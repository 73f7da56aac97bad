"""The Setting interface and the helpers every setting uses.

A setting supplies training chats (whose completions show the undesired behaviour), evaluation
prompts, and a scorer that turns one completion into named booleans. It names which of those is the
behaviour rate b and which the capability c. Nothing else in ipsweep branches on a setting's name.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hydra.utils import get_class

from ipsweep.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class TrainExample:
    messages: list[dict]  # the chat up to (not including) the assistant reply
    completion: str  # the assistant reply the model is trained on


@dataclass
class EvalExample:
    messages: list[dict]
    eval_set: str  # e.g. task_test, ood_test
    group: str  # reported separately (question type, OOD label, ...)
    meta: dict = field(default_factory=dict)  # whatever the scorer needs (gold answer, kind, ...)

    @property
    def item_id(self) -> str:
        """Stable id of this eval item: a hash of its eval set and unmodified messages, so the same
        question has the same id in every run, seed, epoch and test prompt (comparisons pair by it)."""
        text = json.dumps([self.eval_set, self.messages], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class Setting(Protocol):
    behaviour_metric: str  # key of score() that is the undesired behaviour
    capability_metric: str  # key of score() that is the desired capability
    # Optional `preamble: str`: the fixed sentence that opens every user turn; user_prefix prompts go after it.

    def train_examples(self) -> list[TrainExample]: ...

    def eval_examples(self, n_eval: int | None) -> list[EvalExample]: ...

    def score(self, example: EvalExample, completion: str) -> dict[str, bool | None]:
        """Named booleans for one completion; None where a metric does not apply to this example."""
        ...


def build(setting_cfg) -> Setting:
    """Instantiate `setting_cfg._target_` with `setting_cfg.options`; bad options name the valid ones."""
    cls = get_class(setting_cfg._target_)
    options = dict(setting_cfg.options)
    params = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(
            f"setting '{setting_cfg.name}' has no option {', '.join(unknown)}; fix: use one of {', '.join(params)}"
        )
    return cls(**options)


def data_file(data_dir: str | None, relative: str) -> Path:
    path = (Path(data_dir).expanduser() if data_dir else DATA_DIR) / relative
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}; fix: check setting.options.data_dir (default: the data shipped with ipsweep)")
    return path


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read JSON lines; a malformed line or a missing field names the file and the line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix: repair or remove that line") from None
            missing = [k for k in required if k not in row]
            if missing:
                raise ConfigError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}; fix: add them or remove that line")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no records; fix: point the setting at a non-empty data file")
    return rows
