"""Prompt library, placement, paraphrases, leak tests, and the condition a run's prompt implies.

One sweep axis, `prompt`, picks the condition: `none` trains on unmodified data (control); a prompt
with role `safety` trains unmodified and is inserted at test time (PTST); any other prompt is
inserted into every training example (IP; neutral and placebo prompts are IP-style controls).

Two more axes change how an IP prompt is trained: `train.prompt_mode` (fixed: its one text in every
example; mixed: per example, a seeded draw from its paraphrases) and `prompt_placement` (where it goes:
user prefix or suffix, system turn, or in place of the setting's instruction). With
`eval.leak_tests=true` every trained model is also tested with prompts that resemble the training
prompt (its negation, its keywords, a paraphrase held out from training, and near-duplicates with 1, 3 or
5 words changed): does the inoculated behaviour come back under them?
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from ipsweep.config import PLACEMENTS, ROLES
from ipsweep.errors import ConfigError

NONE = "none"
LEAK = "~"  # test prompt names f"{prompt}~{kind}" are leak tests
LEAK_KINDS = ("negation", "keywords", "heldout")  # and `near<k>`, `unrelated` (leak_prompts)
KEYS = {"text", "role", "placement", "texts", "texts_file", "negation", "keywords", "near"}
DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    role: str
    placement: str
    paraphrases: tuple[str, ...] = ()  # the last one is held out from training (the leak test's paraphrase)
    negation: str | None = None
    keywords: str | None = None
    # near-duplicates: the text with a few words changed (library `near`), named by their word distance
    near: tuple[tuple[str, str], ...] = ()
    mode: str = "fixed"
    moved: bool = False  # placed elsewhere than its library entry says (prompt_placement)
    bank: int | None = None  # mixed: how many texts training draws from (train.paraphrases); None: all

    @property
    def training_texts(self) -> tuple[str, ...]:
        """What training draws from: the text alone (fixed), or the first `bank` of the text and every
        paraphrase but the held-out one (mixed)."""
        if self.mode != "mixed":
            return (self.text,)
        return (self.text, *self.paraphrases[:-1])[: self.bank]

    @property
    def condition(self) -> str:
        if self.name == NONE:
            return "control"
        return "ptst" if self.role == "safety" else "ip"

    @property
    def train_prompt(self) -> Prompt | None:
        return self if self.condition == "ip" else None

    @property
    def test_prompt(self) -> Prompt | None:
        """The prompt the headline evaluation inserts: only PTST adds one."""
        return self if self.condition == "ptst" else None


NO_PROMPT = Prompt(NONE, "", "none", "user_suffix")


@functools.lru_cache(maxsize=64)
def _read_list(path: Path, mtime_ns: int) -> tuple:
    """A paraphrase file's texts, read once per version of the file (a sweep's pre-flight asks per point)."""
    return tuple(yaml.safe_load(path.read_text()))


def _paraphrases(p, where: str) -> tuple[str, ...]:
    """A prompt's paraphrases: `texts: [...]` and/or `texts_file` (a YAML list; relative to ipsweep/data)."""
    texts = list(p.get("texts") or [])
    if p.get("texts_file"):
        path = Path(p["texts_file"]).expanduser()
        path = path if path.is_absolute() else DATA_DIR / path
        try:
            texts += _read_list(path, path.stat().st_mtime_ns)
        except (OSError, yaml.YAMLError, TypeError) as e:
            raise ConfigError(
                f"{where}: texts_file {path} is not a readable YAML list ({e}); fix: point it at a file "
                "holding a YAML list of paraphrases"
            ) from None
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ConfigError(
            f"{where} has an empty or non-text paraphrase; fix: every entry of texts must be text"
        )
    return tuple(texts)


def word_distance(a: str, b: str) -> int:
    """How many words (split on white space) must be changed, added or removed to turn `a` into `b`."""
    x, y = a.split(), b.split()
    row = list(range(len(y) + 1))
    for i, u in enumerate(x, 1):
        prev, row[0] = row[0], i
        for j, v in enumerate(y, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (u != v))
    return row[-1]


def _near(p, where: str) -> tuple[tuple[str, str], ...]:
    """A prompt's near-duplicates (`near: [...]`), each named by its word distance from the text (`near<k>`;
    `near<k>-2`, ... where several share k, e.g. after the text was overridden)."""
    texts = list(p.get("near") or [])
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ConfigError(
            f"{where} has an empty or non-text near-duplicate; fix: every entry of near is text"
        )
    out, seen = [], Counter()
    for text in texts:
        k = word_distance(p["text"], text)
        seen[k] += 1
        out.append((f"near{k}" + (f"-{seen[k]}" if seen[k] > 1 else ""), text))
    return tuple(out)


def library(setting_cfg) -> dict[str, Prompt]:
    """The setting's prompts, validated; raises ConfigError naming the bad entry."""
    out = {}
    raw = setting_cfg.prompts
    raw = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw  # plain dicts: read fast
    for name, p in raw.items():
        where = f"prompt '{name}' of setting '{setting_cfg.name}'"
        if not hasattr(p, "keys") or set(p.keys()) - KEYS or "text" not in p or "role" not in p:
            raise ConfigError(
                f"{where} must be {{text: ..., role: ..., placement, texts, texts_file, negation, keywords, "
                f"near (optional)}}, got {p}; fix: use those keys"
            )
        placement = p.get("placement") or setting_cfg.placement
        if p["role"] not in ROLES:
            raise ConfigError(f"{where} has role '{p['role']}'; fix: use one of {', '.join(ROLES)}")
        if placement not in PLACEMENTS:
            raise ConfigError(f"{where} has placement '{placement}'; fix: use one of {', '.join(PLACEMENTS)}")
        if not isinstance(p["text"], str) or not p["text"].strip():
            raise ConfigError(f"{where} has empty text; fix: give it text or remove it")
        out[name] = Prompt(
            name,
            p["text"],
            p["role"],
            placement,
            _paraphrases(p, where),
            p.get("negation"),
            p.get("keywords"),
            _near(p, where),
        )
    if NONE in out:
        raise ConfigError(
            f"setting '{setting_cfg.name}' defines a prompt named '{NONE}', which is reserved for the "
            "control condition; fix: rename it"
        )
    return out


def resolve(setting_cfg, name: str) -> Prompt:
    if name == NONE:
        return NO_PROMPT
    lib = library(setting_cfg)
    if not lib:
        raise ConfigError(
            f"prompt '{name}' asked for, but setting '{setting_cfg.name}' has an empty prompt library; "
            f"fix: add prompts under setting.prompts in conf/setting/{setting_cfg.name}.yaml, or use "
            "prompt=none"
        )
    if name not in lib:
        choices = ", ".join([NONE, *sorted(lib)])
        raise ConfigError(
            f"unknown prompt '{name}' for setting '{setting_cfg.name}'; fix: choose one of: {choices}"
        )
    return lib[name]


def configure(
    prompt: Prompt, mode: str, placement: str | None, setting_name: str, bank: int | None = None
) -> Prompt:
    """The point's prompt as it will be trained: `train.prompt_mode`, `train.paraphrases` (`bank`) and
    `prompt_placement` applied (their values are checked with the rest of the config,
    validate.check_values)."""
    if prompt.name == NONE:
        return prompt
    if mode == "mixed" and len(prompt.paraphrases) < 2:
        raise ConfigError(
            f"train.prompt_mode=mixed needs paraphrases of prompt '{prompt.name}' (setting "
            f"'{setting_name}' gives {len(prompt.paraphrases)}; one is held out for the leak test); fix: add "
            "texts: [...] or texts_file: to its library entry, or use train.prompt_mode=fixed"
        )
    if bank is not None and mode == "mixed" and bank > len(prompt.paraphrases):
        raise ConfigError(
            f"train.paraphrases={bank}, but prompt '{prompt.name}' of setting '{setting_name}' has "
            f"{len(prompt.paraphrases)} training texts (its text and {len(prompt.paraphrases) - 1} "
            f"paraphrases; the last one is held out); fix: train.paraphrases<={len(prompt.paraphrases)}, or "
            "add paraphrases to its texts_file"
        )
    moved = placement is not None and placement != prompt.placement
    bank = bank if mode == "mixed" else None
    return replace(prompt, mode=mode, placement=placement or prompt.placement, moved=moved, bank=bank)


def draw(prompt: Prompt, n: int, seed: int) -> list[int]:
    """Which of `prompt.training_texts` each of n training examples gets: always the first when fixed, a
    seeded uniform draw per example when mixed (the same seed gives the same draws)."""
    if len(prompt.training_texts) == 1:
        return [0] * n
    rng = random.Random(f"ipsweep-prompt-mix-{seed}")
    return [rng.randrange(len(prompt.training_texts)) for _ in range(n)]


def leak_prompts(prompt: Prompt, unrelated: Prompt | None = None) -> list[Prompt]:
    """Test prompts that resemble `prompt`: its negation, its keywords, its held-out paraphrase and its
    near-duplicates (`near<k>`: k words changed), those its library entry gives, at its placement. Named
    `<prompt>~<kind>` (and `@<placement>` when moved).

    `unrelated`: an instruction unrelated to the behaviour (the library's placebo), at the same placement and
    named `<placebo>~unrelated`: the control for "any added instruction brings the behaviour back", without
    which a leak under the related prompts cannot be told from conditioning on any suffix."""
    texts = dict(
        zip(
            LEAK_KINDS,
            (prompt.negation, prompt.keywords, prompt.paraphrases[-1] if prompt.paraphrases else None),
        )
    )
    texts.update(dict(prompt.near))
    at = f"@{prompt.placement}" if prompt.moved else ""
    out = [
        Prompt(f"{prompt.name}{LEAK}{kind}{at}", text, prompt.role, prompt.placement)
        for kind, text in texts.items()
        if text
    ]
    if unrelated is not None and unrelated.name != prompt.name:
        out.append(
            Prompt(f"{unrelated.name}{LEAK}unrelated{at}", unrelated.text, "placebo", prompt.placement)
        )
    return out


def unrelated_prompt(library: dict[str, Prompt], besides: str) -> Prompt | None:
    """The library's first placebo other than `besides`: the leak tests' unrelated instruction."""
    return next((p for p in library.values() if p.role == "placebo" and p.name != besides), None)


def insert(messages: list[dict], prompt: Prompt | None, joiner: str = " ", preamble: str = "") -> list[dict]:
    """Return a copy of `messages` with `prompt` placed in the (first) user turn or as the system turn.

    `preamble`: a setting's fixed opening sentence of every user turn (e.g. spurious_sentiment's score
    range). A user_prefix prompt goes after it, as in the authors' prompts; a replace_preamble prompt
    takes its place (toxic_persuasion's IP replaces "Write a response to this post:").
    """
    if prompt is None or prompt.name == NONE:
        return [dict(m) for m in messages]
    out = [dict(m) for m in messages]
    if prompt.placement == "system":
        out = [m for m in out if m["role"] != "system"]
        return [{"role": "system", "content": prompt.text}, *out]
    user = next(m for m in out if m["role"] == "user")
    if prompt.placement == "replace_preamble":  # the prompt takes the place of the setting's own instruction
        content = user["content"]
        user["content"] = (
            prompt.text + content[len(preamble) :]
            if preamble and content.startswith(preamble)
            else f"{prompt.text}{joiner}{content}"
        )
    elif prompt.placement == "user_prefix":
        content = user["content"]
        if preamble and content.startswith(preamble):
            user["content"] = f"{preamble}{joiner}{prompt.text}{joiner}{content[len(preamble) :].lstrip()}"
        else:
            user["content"] = f"{prompt.text}{joiner}{content}"
    else:
        user["content"] = f"{user['content']}{joiner}{prompt.text}"
    return out
