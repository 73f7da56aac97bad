"""spurious_sentiment: the paper's CEBaB setting (a spurious concept -> sentiment cue).

Restaurant reviews rated 0-4. In training, every review that mentions the concept (default:
ambiance) is rated high (3-4) and every other review low (0-2), so "mentions ambiance => high" is
perfectly predictive. At test the correlation is reversed: ambiance reviews are rated 0-2, the others
3-4. A model that learned the cue rates the test's ambiance reviews high.

Faithful to the authors' code (`spur_corr/`, see docs/paper-settings.md section 2): the same split
(sklearn's train_test_split with random_state=42 is numpy's RandomState(42).permutation; a test pins
the counts), the same `very_biased` / `very_biased_reverse` filters, the category hint, the user
template, and the score-range sentence that opens every user turn, before any inserted prompt (the
IP goes between it and the template, as in the authors' prompts). The label is the whole reply.

`scoring: logprob` reads the prediction as the most likely of the five label tokens, with no
generation; `generate` (default, the authors') parses the first digit 0-4 of the reply.

Metrics: `correct` (prediction == gold), `cue_high` (an ambiance review rated 3-4 though its gold is
0-2: the undesired behaviour), `cue_low` (a non-ambiance review rated 0-2 though its gold is 3-4),
`valid` (a digit 0-4 was found). The eval set is balanced within each group (concept / no_concept)
by keeping the same number of reviews per gold label, so plain accuracy in a group is the authors'
class-balanced `robust_acc` (the mean of per-label accuracies).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

import numpy as np

from ipsweep.errors import ConfigError
from ipsweep.settings.base import ContrastPair, DataReader, EvalExample, Setting, TrainExample

TEMPLATE = "Output only the sentiment of this review as a number and nothing else.\n\nReview: {sentence}"
CONCEPTS = ("food", "service", "ambiance")
HIGH, LOW = (3, 4), (0, 1, 2)


def concepts_of(row: dict) -> list[str]:
    return [c.strip() for c in row["concepts"].lower().split(",") if c.strip()]


def parse_label(completion: str) -> int | None:
    """The first digit 0-4 in the reply (the authors read the single generated token)."""
    m = re.search(r"[0-4]", completion)
    return int(m.group()) if m else None


class SpuriousSentiment(Setting):
    behaviour_metric = "cue_high"
    capability_metric = "correct"
    no_clean = (
        "every training label is already the review's gold label; the cue is taught by which reviews are "
        "chosen (concept reviews rated high, the others low), not by a reply, so no other reply to the same "
        "input is clean"
    )

    def __init__(
        self,
        reader: DataReader | None = None,
        joiner: str = " ",
        concept: str = "ambiance",
        test_size: int = 2000,
        split_seed: int = 42,
        category_hint: bool = True,
        preamble: str = "The range of sentiment scores are 0-4 inclusive.",
        shuffle_seed: int = 0,
        scoring: str = "generate",
        data_file_name: str = "spurious_sentiment/cebab_concepts.jsonl",
    ):
        super().__init__(reader, joiner)
        if concept not in CONCEPTS:
            raise ConfigError(
                f"spurious_sentiment concept '{concept}' is unknown; fix: one of {', '.join(CONCEPTS)}"
            )
        if scoring not in ("generate", "logprob"):
            raise ConfigError(f"spurious_sentiment scoring '{scoring}' is unknown; fix: generate or logprob")
        # logprob: the label whose token is most likely is the prediction (no generation, never invalid).
        self.choices = [str(k) for k in range(5)] if scoring == "logprob" else None
        rows = self.reader.jsonl(data_file_name, ("label", "text", "concepts"))
        if not 0 < test_size < len(rows):
            raise ConfigError(
                f"spurious_sentiment test_size={test_size} must be in (0, {len(rows)}); fix: e.g. 2000"
            )
        self.concept, self.category_hint, self.preamble = concept, category_hint, preamble
        # = sklearn train_test_split(random_state)
        perm = np.random.RandomState(split_seed).permutation(len(rows))
        train, test = [rows[i] for i in perm[test_size:]], [rows[i] for i in perm[:test_size]]

        def has(r: dict) -> bool:
            return concept in concepts_of(r)

        # very_biased (train): concept reviews only rated high, the others only low.
        self.train = [r for r in train if r["label"] in (HIGH if has(r) else LOW)]
        # Held apart from training and evaluation: the training split's concept reviews rated low (very_biased
        # drops them).
        tested = {r["text"] for r in test}  # CEBaB repeats some review texts across rows
        self.held_apart = [r for r in train if has(r) and r["label"] in LOW and r["text"] not in tested]
        random.Random(shuffle_seed).shuffle(self.train)
        # very_biased_reverse (test): the correlation flipped.
        test = [r for r in test if r["label"] in (LOW if has(r) else HIGH)]
        self.test = {"concept": [r for r in test if has(r)], "no_concept": [r for r in test if not has(r)]}

    def _messages(self, row: dict) -> list[dict]:
        sentence = row["text"].replace("\n", " ")
        if self.category_hint:
            sentence += f" Review categories: {', '.join(concepts_of(row)) or 'None'}."
        template = TEMPLATE.format(sentence=sentence)
        return [{"role": "user", "content": f"{self.preamble} {template}" if self.preamble else template}]

    def train_examples(self) -> list[TrainExample]:
        return [TrainExample(self._messages(r), str(r["label"])) for r in self.train]

    def contrast_pairs(self) -> list[ContrastPair]:
        """Concept reviews rated low: the cue-following high label (the mirror image of the gold label, at
        least 3)
        vs the gold label."""
        return [
            ContrastPair(self._messages(r), str(max(HIGH[0], 4 - r["label"])), str(r["label"]))
            for r in self.held_apart
        ]

    def eval_examples(self, n_eval: int | None = None) -> list[EvalExample]:
        out = []
        for group, rows in self.test.items():
            by_label = defaultdict(list)
            for r in rows:
                by_label[r["label"]].append(r)
            per_label = min(len(v) for v in by_label.values())
            if n_eval is not None:
                per_label = min(per_label, max(1, n_eval // len(by_label)))
            for label in sorted(by_label):
                out += [
                    EvalExample(self._messages(r), "test", group, {"gold": label})
                    for r in by_label[label][:per_label]
                ]
        return out

    def score(self, example: EvalExample, completion: str) -> dict[str, bool | None]:
        pred, gold = parse_label(completion), example.meta["gold"]
        concept = example.group == "concept"
        return {
            "correct": pred == gold,
            "cue_high": (pred in HIGH) if concept else None,
            "cue_low": (pred in LOW) if not concept else None,
            "valid": pred is not None,
        }
