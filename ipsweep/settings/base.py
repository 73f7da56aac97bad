"""The Setting interface and the helpers every setting uses.

A setting supplies training chats (whose completions show the undesired behaviour), evaluation
prompts, and a scorer that turns one completion into named booleans. It names which of those is the
behaviour rate b and which the capability c. Nothing else in ipsweep branches on a setting's name.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra.utils import get_class, instantiate

from ipsweep import prompts
from ipsweep.cache import file_digest
from ipsweep.errors import ConfigError
from ipsweep.prompts import Prompt

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class TrainExample:
    messages: list[dict]  # the chat up to (not including) the assistant reply
    completion: str  # the assistant reply the model is trained on (it shows the undesired behaviour)
    # the setting's reply to the same input without the behaviour (setting.flawed_share < 1 trains on it);
    # None where the setting has none for this input (Setting.no_clean says why)
    clean: str | None = None


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


@dataclass
class ContrastPair:
    """Material for the contrastive log-prob elicitation estimator: one chat and two replies to it that
    differ, as far as the setting's data allow, only in showing the undesired behaviour."""

    messages: list[dict]  # the unmodified chat up to the reply (the prompt is inserted into it)
    shows: str  # a reply that shows the behaviour
    lacks: str  # the matched reply that does not


class DataReader:
    """How a setting reads its data files: from `data_dir` (setting.options.data_dir), else the data shipped
    with ipsweep. It keeps every file read, so their content enters the run's identity (`digests`)."""

    def __init__(self, data_dir: str | None = None):
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None
        self.read: set[Path] = set()

    def path(self, relative: str | Path) -> Path:
        """A data file by its path under the data folder (an absolute path is taken as it is)."""
        path = (self.data_dir or DATA_DIR) / relative
        if not path.is_file():
            raise ConfigError(
                f"data file not found: {path}; fix: check setting.options.data_dir (default: the data "
                "shipped with ipsweep)"
            )
        return path

    def digests(self) -> dict[str, str]:
        """The content digest of every file read so far, by its name in the run's identity."""
        return {_data_name(p): file_digest(p) for p in sorted(self.read)}

    def json(self, relative: str | Path):
        """A whole-file JSON data file; a damaged one names the file, the position and the fix."""
        path = self.path(relative)
        self.read.add(path.resolve())
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix: restore the "
                "file (reinstall ipsweep, `git checkout` it, or copy it again from its source)"
            ) from None

    def jsonl(self, relative: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
        """JSON lines; a malformed line or a missing field names the file and the line number."""
        path = self.path(relative)
        self.read.add(path.resolve())
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(_row(path, lineno, line, required))
        if not rows:
            raise ConfigError(f"{path} holds no records; fix: point the setting at a non-empty data file")
        return rows


def _row(path: Path, lineno: int, line: str, required: tuple[str, ...]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}:{lineno}: not valid JSON ({e.msg}); fix: repair or remove that line"
        ) from None
    missing = [k for k in required if k not in row]
    if missing:
        raise ConfigError(
            f"{path}:{lineno}: missing field(s) {', '.join(missing)}; fix: add them or remove that line"
        )
    return row


class Setting(ABC):
    """What every setting is. A subclass reads its data in `__init__` through `reader` and names its two
    metrics; `build` makes one from conf/setting/<name>.yaml."""

    behaviour_metric: str  # key of score() that is the undesired behaviour
    capability_metric: str  # key of score() that is the desired capability
    # the fixed sentence that opens every user turn ("" for none): user_prefix prompts go after it, and
    # placement replace_preamble replaces it
    preamble: str = ""
    # when set, evaluation scores the most likely of these answer tokens instead of a generated reply
    choices: list[str] | None = None
    # why some or all training inputs have no clean reply (TrainExample.clean is None): named in the error
    # when setting.flawed_share asks for more clean replies than there are
    no_clean: str = "its data hold no reply without the behaviour"

    def __init__(self, reader: DataReader | None = None, joiner: str = " "):
        self.reader = reader or DataReader()
        self.joiner = joiner  # how `insert` joins a prompt to a turn (setting.joiner)

    @property
    def data_digests(self) -> dict[str, str]:
        """The content of every data file it read: part of the run's identity (identity.inputs)."""
        return self.reader.digests()

    @abstractmethod
    def train_examples(self) -> list[TrainExample]: ...

    @abstractmethod
    def eval_examples(self, n_eval: int | None = None) -> list[EvalExample]: ...

    @abstractmethod
    def score(self, example: EvalExample, completion: str) -> dict[str, bool | None]:
        """Named booleans for one completion; None where a metric does not apply to this example."""

    def score_many(self, pairs: list[tuple[EvalExample, str]]) -> list[dict[str, bool | None]]:
        """score() of each (example, completion), in order. Settings whose scorers wait on processes or
        servers (code tests, judges) override it to score several at once; the results are score()'s."""
        return [self.score(example, completion) for example, completion in pairs]

    @abstractmethod
    def contrast_pairs(self) -> list[ContrastPair]:
        """Matched replies for the logprob estimator, from items other than the headline eval items where
        the data allow (docs/settings.md says which, per setting)."""


def flawed_share(
    setting: Setting, name: str, examples: list[TrainExample], share: float, seed: int
) -> tuple[list[TrainExample], dict]:
    """`examples` with all but round(share x n) of them trained on their clean reply instead, which ones drawn
    with `seed` among those that have one; and what was trained, for the record. Raises ConfigError, naming
    the setting's reason, when fewer examples have a clean reply than the share needs."""
    n = len(examples)
    n_clean = n - round(share * n)
    if share >= 1 or not n_clean:
        return examples, {"share": share, "flawed": n, "clean": 0}
    have = [i for i, ex in enumerate(examples) if ex.clean is not None]
    if len(have) < n_clean:
        lowest = math.ceil((1 - len(have) / n) * 100) / 100  # rounded up: the smallest share that works
        raise ConfigError(
            f"setting.flawed_share={share} trains {n_clean} of {n} examples on a clean reply, but setting "
            f"'{name}' has one for {len(have)} of them: {setting.no_clean}; fix: "
            + (f"setting.flawed_share>={lowest:.2f}" if have else "setting.flawed_share=1 (its only value)")
        )
    chosen = set(random.Random(f"ipsweep-flawed-{seed}").sample(have, n_clean))
    out = [replace(ex, completion=ex.clean) if i in chosen else ex for i, ex in enumerate(examples)]
    return out, {"share": share, "flawed": n - n_clean, "clean": n_clean, "seed": seed}


def insert(setting: Setting, messages: list[dict], prompt: Prompt | None) -> list[dict]:
    """The one place a prompt enters a chat (training, evaluation, elicitation): the setting's joiner and
    preamble."""
    return prompts.insert(messages, prompt, setting.joiner, setting.preamble)


def build(setting_cfg) -> Setting:
    """`setting_cfg._target_` instantiated with `setting_cfg.options`; bad options name the valid ones."""
    options = dict(setting_cfg.options)
    params = inspect.signature(get_class(setting_cfg._target_)).parameters
    valid = [*(p for p in params if p not in ("reader", "joiner")), "data_dir"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"setting '{setting_cfg.name}' has no option {', '.join(unknown)}; fix: use one of "
            f"{', '.join(valid)}"
        )
    reader = DataReader(options.pop("data_dir", None))
    return instantiate(
        {"_target_": setting_cfg._target_, **options},
        reader=reader,
        joiner=setting_cfg.joiner,
        _convert_="all",
    )


def _data_name(path: Path) -> str:
    """How a data file is named in a run's identity: relative to the shipped data, else its file name."""
    try:
        return str(path.relative_to(DATA_DIR.resolve()))
    except ValueError:
        return path.name
