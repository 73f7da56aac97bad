"""Benchmark 12: code_reward_hack's scoring, the programs one at a time vs side by side (Setting.score_many,
the path an evaluation takes: as many sandboxes at once as the process may use CPUs). The MBPP reference
solutions of the first --n eval problems; the outcomes must be the same.

  python benchmarks/code_scoring.py --n 80
"""

from __future__ import annotations

import argparse
import json

from common import Timer, device, save

from ipsweep.settings.base import DATA_DIR
from ipsweep.settings.code_reward_hack import CodeRewardHack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=80)
    a = ap.parse_args()
    setting = CodeRewardHack()
    reference = {
        r["task_id"]: r["code"]
        for r in json.loads((DATA_DIR / "code_reward_hack" / "sanitized-mbpp.json").read_text())
    }
    examples = setting.eval_examples(None)[: a.n]
    pairs = [(e, reference[e.meta["task_id"]]) for e in examples]
    for e in examples:  # the expected values, computed once per problem, are not what is timed
        setting.expected(e)
    with Timer() as one:
        alone = [setting.score_many([pair])[0] for pair in pairs]
    with Timer() as many:
        together = setting.score_many(pairs)
    rows = [
        {"arm": "one program at a time", "programs": len(pairs), "seconds": one.s},
        {"arm": "side by side (score_many)", "programs": len(pairs), "seconds": many.s},
    ]
    save("code_scoring", rows, speedup=one.s / many.s, same_outcomes=alone == together, on=device())


if __name__ == "__main__":
    main()
