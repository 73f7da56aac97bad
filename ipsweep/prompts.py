"""Prompt library, placement, and the condition a run's prompt implies.

One sweep axis, `prompt`, picks the condition: `none` trains on unmodified data (control); a prompt
with role `safety` trains unmodified and is inserted at test time (PTST); any other prompt is
inserted into every training example (IP; neutral and placebo prompts are IP-style controls).
"""

from __future__ import annotations

from dataclasses import dataclass

from ipsweep.config import PLACEMENTS, ROLES
from ipsweep.errors import ConfigError

NONE = "none"


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    role: str
    placement: str

    @property
    def condition(self) -> str:
        if self.name == NONE:
            return "control"
        return "ptst" if self.role == "safety" else "ip"

    @property
    def train_prompt(self) -> "Prompt | None":
        return self if self.condition == "ip" else None

    @property
    def test_prompt(self) -> "Prompt | None":
        """The prompt the headline evaluation inserts: only PTST adds one."""
        return self if self.condition == "ptst" else None


NO_PROMPT = Prompt(NONE, "", "none", "user_suffix")


def library(setting_cfg) -> dict[str, Prompt]:
    """The setting's prompts, validated; raises ConfigError naming the bad entry."""
    out = {}
    for name, p in setting_cfg.prompts.items():
        where = f"prompt '{name}' of setting '{setting_cfg.name}'"
        if not hasattr(p, "keys") or set(p.keys()) - {"text", "role", "placement"} or "text" not in p or "role" not in p:
            raise ConfigError(f"{where} must be {{text: ..., role: ..., placement: (optional)}}, got {p}; fix: use those keys")
        placement = p.get("placement") or setting_cfg.placement
        if p["role"] not in ROLES:
            raise ConfigError(f"{where} has role '{p['role']}'; fix: use one of {', '.join(ROLES)}")
        if placement not in PLACEMENTS:
            raise ConfigError(f"{where} has placement '{placement}'; fix: use one of {', '.join(PLACEMENTS)}")
        if not isinstance(p["text"], str) or not p["text"].strip():
            raise ConfigError(f"{where} has empty text; fix: give it text or remove it")
        out[name] = Prompt(name, p["text"], p["role"], placement)
    if NONE in out:
        raise ConfigError(f"setting '{setting_cfg.name}' defines a prompt named '{NONE}', which is reserved for the control condition; fix: rename it")
    return out


def resolve(setting_cfg, name: str) -> Prompt:
    if name == NONE:
        return NO_PROMPT
    lib = library(setting_cfg)
    if not lib:
        raise ConfigError(f"prompt '{name}' asked for, but setting '{setting_cfg.name}' has an empty prompt library; "
                          f"fix: add prompts under setting.prompts in conf/setting/{setting_cfg.name}.yaml, or use prompt=none")
    if name not in lib:
        choices = ", ".join([NONE, *sorted(lib)])
        raise ConfigError(f"unknown prompt '{name}' for setting '{setting_cfg.name}'; fix: choose one of: {choices}")
    return lib[name]


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
        user["content"] = prompt.text + content[len(preamble):] if preamble and content.startswith(preamble) \
            else f"{prompt.text}{joiner}{content}"
    elif prompt.placement == "user_prefix":
        content = user["content"]
        if preamble and content.startswith(preamble):
            user["content"] = f"{preamble}{joiner}{prompt.text}{joiner}{content[len(preamble):].lstrip()}"
        else:
            user["content"] = f"{prompt.text}{joiner}{content}"
    else:
        user["content"] = f"{user['content']}{joiner}{prompt.text}"
    return out
