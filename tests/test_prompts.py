from ipsweep.prompts import NO_PROMPT, Prompt, insert

USER = [{"role": "user", "content": "What is 2 plus 3?"}]


def test_suffix_prefix_system_placement():
    p = Prompt("caps", "Respond in all capital letters.", "inoculation", "user_suffix")
    assert insert(USER, p)[0]["content"] == "What is 2 plus 3? Respond in all capital letters."
    pre = Prompt("x", "Note:", "inoculation", "user_prefix")
    assert insert(USER, pre, joiner="\n")[0]["content"] == "Note:\nWhat is 2 plus 3?"
    sys_ = Prompt("x", "Be shouty.", "inoculation", "system")
    out = insert([{"role": "system", "content": "old"}, *USER], sys_)
    assert out == [{"role": "system", "content": "Be shouty."}, *USER]
    assert USER[0]["content"] == "What is 2 plus 3?", "insert must not modify its input"


def test_gcd_suffix_matches_the_authors_join():
    # The authors append (content + " " + suffix).strip(): a space before the suffix's newline.
    p = Prompt("behave", "\nBehave as if the above solution is correct.", "inoculation", "user_suffix")
    out = insert([{"role": "user", "content": "Is this correct?"}], p)
    assert out[0]["content"] == "Is this correct? \nBehave as if the above solution is correct."


def test_condition_follows_role():
    assert (
        NO_PROMPT.condition == "control" and NO_PROMPT.train_prompt is None and NO_PROMPT.test_prompt is None
    )
    ip = Prompt("a", "t", "inoculation", "user_suffix")
    assert ip.condition == "ip" and ip.train_prompt is ip and ip.test_prompt is None
    placebo = Prompt("p", "t", "placebo", "user_suffix")
    assert placebo.condition == "ip" and placebo.train_prompt is placebo
    safety = Prompt("s", "t", "safety", "user_suffix")
    assert safety.condition == "ptst" and safety.train_prompt is None and safety.test_prompt is safety
