"""Config composition: every setting and experiment composes; user mistakes fail before any job with a clear
message."""

import pytest
from conftest import CONF, launch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from ipsweep import prompts
from ipsweep.errors import ConfigError
from ipsweep.settings.base import build

SETTINGS = sorted(p.stem for p in (CONF / "setting").glob("*.yaml"))


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_composes_and_builds(make_cfg, name, request):
    extra = []
    # its data and judges are the user's: the fixture and a localhost server stand in
    if name == "toxic_persuasion":
        cmv = request.getfixturevalue("cmv")
        extra = cmv.overrides(cmv.data_dir, cmv.cache_dir)
    cfg = make_cfg(f"setting={name}", *extra)
    setting = build(cfg.setting)
    lib = prompts.library(cfg.setting)
    assert setting.train_examples() and setting.eval_examples(5)
    assert any(p.role == "inoculation" for p in lib.values()), (
        "a setting needs at least one inoculation prompt"
    )
    ex = setting.eval_examples(5)[0]
    scores = setting.score(ex, "some reply")
    assert {setting.behaviour_metric, setting.capability_metric} <= set(scores)
    pairs = setting.contrast_pairs()  # the logprob estimator's material
    assert pairs and all(p.shows.strip() and p.lacks.strip() and p.shows != p.lacks for p in pairs)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(make_cfg, name):
    cfg = make_cfg(f"experiment={name}")
    for p in cfg.eval.extra_test_prompts:
        prompts.resolve(cfg.setting, p)


def test_unknown_setting_lists_choices(make_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("setting=gcd_sycophantic")
    assert (
        "gcd_sycophantic" in str(e.value)
        and "gcd_sycophancy" in str(e.value)
        and "trait_pair" in str(e.value)
    )


def test_a_misspelt_preset_fails_with_the_presets_instead_of_running_the_default(make_cfg):
    """experiment is a config group with no default: a name that is not a preset is an error that lists
    them (an optional group would skip it and launch the default sweep)."""
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("experiment=paraphrase_cout")
    assert "Could not find 'experiment/paraphrase_cout'" in str(e.value) and "paraphrase_count" in str(
        e.value
    )
    assert make_cfg().get("compare") == [] and make_cfg("experiment=case_2x2").compare


def test_bad_type_fails_at_compose(make_cfg):
    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        make_cfg("train.epochs=two")
    assert "epochs" in str(e.value) and "two" in str(e.value)


def test_unknown_key_fails_at_compose(make_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("train.learning_rate=1e-4")
    assert "learning_rate" in str(e.value)


def test_unknown_prompt_names_the_valid_ones(make_cfg):
    cfg = make_cfg("prompt=caps_strnog")
    with pytest.raises(
        ConfigError, match=r"unknown prompt 'caps_strnog' for setting 'trait_pair'.*caps_strong"
    ):
        prompts.resolve(cfg.setting, cfg.prompt)


def test_unknown_setting_option_names_the_valid_ones(make_cfg):
    cfg = make_cfg("+setting.options.per_typ=10")
    with pytest.raises(ConfigError, match=r"no option per_typ.*per_type"):
        build(cfg.setting)


def test_cfg_job_prints_resolved_config(tmp_path):
    out = launch("--cfg", "job", sweep_dir=tmp_path / "s").stdout
    assert "setting:" in out and "name: trait_pair" in out and "lr: 0.0005" in out


def test_prompt_added_on_the_command_line_is_validated(make_cfg):
    cfg = make_cfg("+setting.prompts.mine={text: Shout., role: inoculation}", "prompt=mine")
    assert prompts.resolve(cfg.setting, "mine").text == "Shout."
    cfg = make_cfg("+setting.prompts.mine={text: Shout., role: inoculatoin}")
    with pytest.raises(
        ConfigError, match=r"prompt 'mine' of setting 'trait_pair' has role 'inoculatoin'.*inoculation"
    ):
        prompts.library(cfg.setting)


@pytest.mark.parametrize("name", SETTINGS)
def test_every_library_spans_roles(make_cfg, name):
    roles = [p.role for p in prompts.library(make_cfg(f"setting={name}").setting).values()]
    assert roles.count("inoculation") >= 8 and "safety" in roles and "placebo" in roles and "neutral" in roles


@pytest.mark.parametrize(
    "experiment",
    ["elicitation_correlation", "elicitation_correlation_gcd", "elicitation_correlation_greeting"],
)
def test_correlation_presets_sweep_the_whole_library(make_cfg, experiment):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"experiment={experiment}", "store_dir=x"], return_hydra_config=True
        )
    swept = set(cfg.hydra.sweeper.params.prompt.split(","))
    assert swept == {"none", *prompts.library(cfg.setting)}
