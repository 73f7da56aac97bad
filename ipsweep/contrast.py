"""A declared contrast of arms, as written in a preset's `compare:` or `ipsweep analyze --compare`: arms
joined by ' + ' and ' - ', each with an optional weight ('0.5*ip:a'). Parsed here, on the ground floor, so
the pre-flight refuses a malformed one before any job; computed in ipsweep/analysis/comparisons.py."""

from __future__ import annotations

import math
import re

OPERATOR = re.compile(r"\s+([+-])\s+")  # between terms (arm names hold no spaced + or -)


def parse(contrast: str) -> list[tuple[float, str]]:
    """'ip:a - ip:b' -> [(1, 'ip:a'), (-1, 'ip:b')]; a weight goes before its arm with '*' ('0.5*ip:a'). The
    operators have spaces around them; the weights must sum to 0 (a contrast between arms, not a level)."""
    text = contrast.strip()
    parts = OPERATOR.split((" " if text[:1] in "+-" else " + ") + text)
    terms = []
    for sign, term in zip(parts[1::2], parts[2::2]):
        weight, _, arm = term.rpartition("*")
        try:
            w = float(weight or 1)
        except ValueError:
            w, arm = math.nan, term
        terms.append(((-1 if sign == "-" else 1) * w, arm.strip()))
    if (
        len(terms) < 2
        or not all(math.isfinite(w) and a for w, a in terms)
        or abs(sum(w for w, _ in terms)) > 1e-9
    ):
        raise ValueError(
            f"comparison {contrast!r} is not a contrast of arms; fix: arms joined by ' + ' and ' - ' (spaces "
            "around), weights as '0.5*ip:a', summing to 0: e.g. 'ip:a - ip:b' or 'ip:a - ip:b - ip:c + ip:d'"
        )
    return terms
