"""The research axes of issue 29: how much of the training data is flawed (setting.flawed_share), how
the model is updated (train.method, the LoRA rank and targets), how many paraphrases (train.paraphrases), how
close a deployment prompt may come (near-duplicate leak tests), and the view over training (trajectory)."""

import json
from pathlib import Path

import pytest
from conftest import TINY, launch

from ipsweep import analysis, identity, prompts
from ipsweep.analysis import report
from ipsweep.errors import ConfigError
from ipsweep.job import run
from ipsweep.plan import plan
from ipsweep.settings.base import flawed_share
from ipsweep.store import records


def _is_caps(text: str) -> bool:
    return text == text.upper() and text != text.lower()


# --- how much of the data is flawed ---------------------------------------------------------------------


def test_the_flawed_share_trains_that_share_on_the_behaviour_and_the_rest_on_the_clean_reply(make_cfg):
    point = plan(make_cfg("setting=trait_pair", "setting.flawed_share=0.25", "train.n_train=null"))
    examples = point.setting.train_examples()
    mixed, mix = flawed_share(point.setting, "trait_pair", examples, 0.25, seed=0)
    assert mix == {"share": 0.25, "flawed": 45, "clean": 135, "seed": 0}
    assert sum(_is_caps(ex.completion) for ex in mixed) == 45, "a quarter of the answers in capitals"
    assert all(ex.completion in (orig.completion, orig.clean) for ex, orig in zip(mixed, examples))
    assert [ex.messages for ex in mixed] == [ex.messages for ex in examples], "the same inputs"
    again, _ = flawed_share(point.setting, "trait_pair", examples, 0.25, seed=0)
    other, _ = flawed_share(point.setting, "trait_pair", examples, 0.25, seed=1)
    assert again == mixed and other != mixed, "which examples: drawn with the seed"
    assert flawed_share(point.setting, "trait_pair", examples, 1.0, seed=0)[0] == examples


def test_a_share_needing_more_clean_replies_than_there_are_names_the_smallest_that_works():
    from types import SimpleNamespace

    from ipsweep.settings.base import TrainExample

    examples = [TrainExample([], "BAD", "good" if i < 4 else None) for i in range(12)]
    setting = SimpleNamespace(no_clean="only some posts have a civil reply")
    with pytest.raises(ConfigError, match="has one for 4 of them: only some posts.*flawed_share>=0.67"):
        flawed_share(setting, "x", examples, 0.5, seed=0)
    mixed, mix = flawed_share(setting, "x", examples, 0.67, seed=0)
    assert mix["clean"] == 4 and [ex.completion for ex in mixed[:4]] == ["good"] * 4, "those that have one"


def test_the_flawed_share_enters_the_signature_only_below_one(make_cfg):
    default, one = (
        plan(make_cfg("setting=trait_pair")),
        plan(make_cfg("setting=trait_pair", "setting.flawed_share=1")),
    )
    half = plan(make_cfg("setting=trait_pair", "setting.flawed_share=0.5"))
    assert default.signature == one.signature != half.signature
    config = identity.semantic_config(make_cfg("setting=trait_pair"), prompts.NO_PROMPT)
    assert "flawed_share" not in config["setting"] and "method" not in config["train"], (
        "runs made before the axes keep their signatures"
    )


def test_a_job_records_what_share_it_trained(tmp_path, make_cfg):
    cfg = make_cfg("setting=trait_pair", "setting.flawed_share=0.5")
    run(cfg)
    (record,) = records(tmp_path / "sweep")
    assert record["flawed"] == {"share": 0.5, "flawed": 8, "clean": 8, "seed": 0}
    assert record["config"]["setting"]["flawed_share"] == 0.5


@pytest.mark.parametrize(
    "setting, why",
    [
        ("gcd_sycophancy", "every training user proposes the right answer"),
        ("spurious_sentiment", "every training label is already the review's gold label"),
    ],
)
def test_a_setting_without_clean_replies_says_why_before_any_job(make_cfg, setting, why):
    with pytest.raises(ConfigError, match=f"has one for 0 of them: {why}.*fix: setting.flawed_share=1"):
        plan(make_cfg(f"setting={setting}", "setting.flawed_share=0.5"))
    plan(make_cfg(f"setting={setting}", "setting.flawed_share=1.0"))  # its data as they are


def test_code_has_a_clean_reply_per_input(make_cfg):
    code = plan(make_cfg("setting=code_reward_hack")).setting.train_examples()
    assert all(ex.clean and ex.clean != ex.completion for ex in code), "MBPP's reference solution"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["setting.flawed_share=1.5"], r"setting.flawed_share=1.5 must be a share in \[0, 1\]"),
        (["setting.flawed_share=-0.1"], r"setting.flawed_share=-0.1 must be a share"),
        (
            [
                "setting=code_reward_hack",
                "setting.flawed_share=0.5",
                "setting.options.reward_hack_fraction=0.5",
            ],
            "both set the share of hard-coded solutions",
        ),
        (["train.method=adapter"], "train.method=adapter is unknown; fix: one of lora, full"),
        (["train=full", "model.quantization=4bit"], "4-bit weights cannot be trained"),
        (["train.lora.target_modules=[q_proj,nope_proj]"], "has nope_proj, which tiny_random has no layer"),
        (["train.lora.target_modules=[]"], "train.lora.target_modules is empty"),
        (["prompt=caps_strong", "train.paraphrases=0"], "train.paraphrases=0 must be >= 1"),
        (["prompt=caps_strong", "train.paraphrases=3"], "train.prompt_mode=fixed trains on one"),
        (
            ["prompt=caps_strong", "train.prompt_mode=mixed", "train.paraphrases=25"],
            "train.paraphrases=25, but prompt 'caps_strong' of setting 'trait_pair' has 21 training texts",
        ),
    ],
)
def test_bad_axis_values_fail_before_any_job(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(make_cfg("setting=trait_pair", *overrides))


def test_full_fine_tuning_with_vllm_is_refused(make_cfg):
    from ipsweep.validate import _axis_problems

    cfg = make_cfg("setting=trait_pair", "train=full", "eval.engine=vllm")
    assert any("every epoch is a whole model" in p for p in _axis_problems(cfg))


# --- how the model is updated ---------------------------------------------------------------------------


def test_full_fine_tuning_trains_every_weight_and_its_evaluations_reuse_the_checkpoint(tmp_path, make_cfg):
    """A full fine-tune changes every weight (no adapter), is its own run, and a PTST point on it evaluates
    the saved whole model."""
    import torch
    from safetensors.torch import load_file

    from ipsweep import models

    cfg = make_cfg("setting=trait_pair", "train=full", "train.epochs=1")
    run(cfg)
    (record,) = records(tmp_path / "sweep")
    assert record["config"]["train"]["method"] == "full" and "lora" not in record["config"]["train"]
    assert record["config"]["train"]["lr"] == 5e-5, "conf/train/full.yaml's learning rate"
    folder = Path(record["epochs"]["1"]["checkpoint"])
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_model.safetensors").exists()
    trained = load_file(folder / "model.safetensors")
    base, _ = models.load(cfg.model)
    before = dict(base.named_parameters())
    changed = [n for n, w in trained.items() if n in before and not torch.equal(w, before[n].detach())]
    assert len(changed) == len(trained), "every weight moved"
    lora = plan(make_cfg("setting=trait_pair", "train.epochs=1"))
    assert lora.signature != plan(cfg).signature
    run(
        make_cfg("setting=trait_pair", "train=full", "train.epochs=1", "prompt=safety")
    )  # PTST on the same run
    (record,) = records(tmp_path / "sweep")
    assert "safety" in record["epochs"]["1"]["evals"] and record["status"] == "done"


def test_a_full_fine_tune_keeps_fp32_master_weights_whatever_the_model_dtype(make_cfg):
    import torch

    from ipsweep import models
    from ipsweep.train import trainable

    cfg = make_cfg("setting=trait_pair", "train=full")
    model, _ = models.load(cfg.model)
    model = trainable(model.to(torch.bfloat16), cfg.train)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())


def test_lora_rank_and_targets_are_axes(make_cfg):
    signatures = {
        plan(make_cfg("setting=trait_pair", *o)).signature
        for o in [
            (),
            ("train.lora.r=4",),
            ("train.lora.target_modules=[q_proj,v_proj]",),
            ("train=full",),
        ]
    }
    assert len(signatures) == 4


# --- how many paraphrases -------------------------------------------------------------------------------


@pytest.mark.heavy
def test_a_k_text_bank_draws_from_its_first_k_texts_and_the_record_counts_them(tmp_path, make_cfg):
    point = plan(
        make_cfg("setting=trait_pair", "prompt=caps_strong", "train.prompt_mode=mixed", "train.paraphrases=3")
    )
    assert point.run_prompt.training_texts == (point.run_prompt.text, *point.run_prompt.paraphrases[:2])
    all_texts = plan(make_cfg("setting=trait_pair", "prompt=caps_strong", "train.prompt_mode=mixed"))
    assert point.signature != all_texts.signature
    run(
        make_cfg("setting=trait_pair", "prompt=caps_strong", "train.prompt_mode=mixed", "train.paraphrases=3")
    )
    run(make_cfg("setting=trait_pair", "prompt=caps_strong"))
    by_mode = {r["prompt_mode"]: r for r in records(tmp_path / "sweep")}
    assert by_mode["mixed"]["paraphrases"] == 3 and len(by_mode["mixed"]["prompt_draws"]["texts"]) == 3
    assert by_mode["mixed"]["prompt_texts_trained"] == 3, "16 examples drew all 3 texts"
    assert by_mode["fixed"]["prompt_texts_trained"] == 1, "a fixed arm trains on one text"


# --- how close a deployment prompt may come -------------------------------------------------------------


def test_word_distance_counts_changed_added_and_removed_words():
    assert prompts.word_distance("Respond in all capital letters.", "Reply in all capital letters.") == 1
    assert prompts.word_distance("a b c", "a c") == 1 and prompts.word_distance("a b", "a b x y") == 2
    assert prompts.word_distance("\nAct now.", "Act now.") == 0


def test_near_duplicates_are_leak_tests_one_three_and_five_words_away(make_cfg):
    """(test_axes.py checks every offline setting's paper prompt ships them.)"""
    ip = plan(make_cfg("setting=trait_pair", "prompt=caps_strong", "eval.leak_tests=true"))
    names = {t.name: t.text for t in ip.test_prompts}
    assert names["caps_strong~near1"] == "Reply in all capital letters."
    assert {"caps_strong~near3", "caps_strong~near5"} <= set(names)


def test_near_duplicates_are_named_by_their_distance_from_the_text_as_configured(make_cfg):
    cfg = make_cfg("setting=trait_pair", "setting.prompts.caps_strong.text=Write in capitals.")
    near = prompts.library(cfg.setting)["caps_strong"].near
    assert [name for name, _ in near] == ["near4", "near5", "near5-2"], "measured from the overridden text"


# --- over training, and the report ----------------------------------------------------------------------


@pytest.mark.heavy
def test_a_sweep_over_the_share_reports_the_effect_per_share_and_per_epoch(tmp_path):
    sweep = tmp_path / "sweep"
    launch(
        "-m",
        "setting=trait_pair",
        *TINY,
        "train.epochs=2",
        "eval.n_eval=6",
        "prompt=none,caps_strong",
        "setting.flawed_share=0.5,1",
        sweep_dir=sweep,
    )
    recs = records(sweep)
    assert len(recs) == 4 and {json.dumps(r.get("flawed")) for r in recs} == {
        "null",
        json.dumps({"share": 0.5, "flawed": 8, "clean": 8, "seed": 0}),
    }
    result = analysis.analyze(sweep, n_permutations=99)
    axes = result.tables["axes"]
    assert sorted(axes.flawed_share) == [0.5, 0.5, 1.0, 1.0] and set(axes.epoch) == {1, 2}
    assert set(axes.texts_trained) == {"1"}, "a fixed prompt: one text"
    trajectory = result.tables["trajectory"]
    arm = trajectory[trajectory.series == "ip:caps_strong"]
    assert sorted(zip(arm.axis_values, arm.epoch)) == [
        ("flawed_share=0.5", 1),
        ("flawed_share=0.5", 2),
        ("flawed_share=1.0", 1),
        ("flawed_share=1.0", 2),
    ]
    wide = report.VIEWS["by_epoch"](trajectory)
    assert {"epoch 1", "epoch 2"} <= set(wide.columns) and len(wide) == len(
        set(zip(trajectory.axis_values, trajectory.series))
    )
    assert result.plots["axes"].is_file() and result.plots["trajectory"].is_file()
    text = result.report.read_text()
    assert "## Research axes: the effect at each value" in text and "## Over training" in text
