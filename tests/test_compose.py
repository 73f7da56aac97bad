"""The pre-flight composes a sweep's points by copying (hydra_plugins/ipsweep_plugins/compose.py): for every
preset and for sweeps that mix config groups, additions and plain values, each point's config must equal
what Hydra's own load_sweep_config composes for that job."""

from __future__ import annotations

import pytest
from conftest import CONF
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from hydra_plugins.ipsweep_plugins.compose import Composer
from ipsweep import plan

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _jobs_and_composers(arguments: list[str]):
    """The sweep's jobs as ipsweep's sweeper lists them (its params, then the command line), the config
    loader and the master config, as `python launch.py -m <arguments>` has them."""
    loader = GlobalHydra.instance().config_loader()
    master = loader.load_configuration("config", arguments, run_mode=RunMode.MULTIRUN)
    params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
    parser = OverridesParser.create(config_loader=loader)
    batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *arguments]), None)
    return [job for batch in batches for job in batch], loader, master


def _assert_same_as_hydra(arguments: list[str]) -> int:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        jobs, loader, master = _jobs_and_composers(arguments)
        compose = Composer(loader, master)
        for job in jobs:
            cfg, env_set = compose(list(job))
            hydra = loader.load_sweep_config(master, list(job))
            assert OmegaConf.to_container(cfg) == OmegaConf.to_container(plan.job_config(hydra)), job
            assert env_set == dict(hydra.hydra.job.env_set), job
        assert None not in compose.templates.values(), "a set of points fell back to Hydra's composition"
        return len(jobs), len(compose.templates)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.heavy
def test_every_preset_point_composes_as_hydra_composes_it(preset):
    jobs, composed = _assert_same_as_hydra([f"experiment={preset}", "store_dir=x"])
    assert composed <= jobs


@pytest.mark.parametrize(
    "arguments, jobs, compositions",
    [
        # a config-group axis, an interpolated value (train.max_length: ${setting.max_length}) and plain axes
        (
            [
                "setting=trait_pair,gcd_sycophancy",
                "prompt=none",
                "train.seed=0,1",
                "train.max_length=128,256",
            ],
            8,
            2,
        ),
        # a value added with +, a list value, a deletion and a hydra override on the command line
        (
            [
                "prompt=none,caps_strong",
                "eval.extra_test_prompts=[caps_ok],[]",
                "~setting.prompts.caps_weak",
                "hydra.job.chdir=false",
                "model=tiny_random,smollm2_135m",
            ],
            8,
            2,
        ),
        # values that read the point's own hydra node: its override list, and the sweep dir through `name`
        (["name=a,b", "+tag=${hydra:job.override_dirname}", "train.seed=0,1"], 4, 1),
        # config groups only: each point is Hydra's own composition
        (["setting=trait_pair,gcd_sycophancy", "model=tiny_random,smollm2_135m"], 4, 4),
    ],
    ids=[
        "group axis, interpolation, plain axes",
        "list values, deletion, hydra override",
        "hydra values per point",
        "groups only",
    ],
)
def test_sweeps_mixing_groups_and_values_compose_as_hydra_composes_them(arguments, jobs, compositions):
    assert _assert_same_as_hydra(arguments) == (jobs, compositions), "one composition per config-group choice"
