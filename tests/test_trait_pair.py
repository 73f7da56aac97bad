from collections import Counter

from ipsweep.settings.trait_pair import TYPES, TraitPair, contains_answer, is_caps


def test_split_is_balanced_disjoint_and_fixed():
    s = TraitPair()
    train_q = {ex.messages[0]["content"] for ex in s.train_examples()}
    test = s.eval_examples()
    assert len(train_q) == 180 and len(test) == 60
    assert not train_q & {ex.messages[0]["content"] for ex in test}
    assert Counter(ex.group for ex in test) == {t: 12 for t in TYPES}
    assert [e.messages for e in TraitPair().eval_examples()] == [e.messages for e in test]


def test_training_answers_show_both_traits():
    s = TraitPair()
    for ex in s.train_examples():
        assert is_caps(ex.completion)


def test_scorers():
    assert is_caps("THE CAPITAL OF FRANCE IS PARIS.") and not is_caps("The capital of France is Paris.")
    assert not is_caps("12 + 3 = 15"), "a reply without letters is not caps"
    assert contains_answer("THE PLURAL OF MOUSE IS MICE.", "mice")
    assert contains_answer("4 plus 12 is 16.", "16") and not contains_answer("4 plus 12 is 116.", "16")
    assert contains_answer("The capital of Colombia is Bogotá.", "Bogota")
