"""Every sweep point's job config as Hydra would compose and resolve it, at the cost of a copy.

Hydra composes each point from scratch (~0.2 s: defaults tree, YAML, merges), which made the pre-flight of a
thousand-point sweep take minutes. Points of one sweep mostly differ in plain values (`train.seed=3`), which
Hydra applies after composing, onto a config the values do not change. So a point is composed once per
distinct set of its other overrides (config groups such as `setting=...`, appends, deletions, `hydra.*`);
each point's plain values are applied to a copy of that composition's job part (the config without its
`hydra` node, which plain values cannot change), and it is resolved with the composition's `hydra` node
carrying the point's own override list. The first point of every such set is also composed by Hydra and
compared; on any difference that set falls back to Hydra's composition.
"""

from __future__ import annotations

import copy
import logging

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf, read_write

from ipsweep import plan

log = logging.getLogger(__name__)


class Template:
    """One Hydra composition, and its points: its job part with a point's plain values, resolved."""

    def __init__(self, sweep_config: DictConfig, master: DictConfig):
        self.master, self.env_set = master, dict(sweep_config.hydra.job.env_set)
        self.job = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        OmegaConf.set_struct(self.job, OmegaConf.is_struct(sweep_config))  # a typo'd key fails as in Hydra
        self.hydra = OmegaConf.masked_copy(sweep_config, "hydra")  # what ${hydra:...} reads

    def point(self, parsed: list[Override], plain: list[Override]) -> tuple[DictConfig, dict]:
        job = copy.deepcopy(self.job)
        ConfigLoaderImpl._apply_overrides_to_config(plain, job)
        OmegaConf.set_struct(job, None)  # as plan.job_config's copy has it
        OmegaConf.copy_cache(from_config=self.master, to_config=job)  # the sweep's ${now:}
        task = [o for o in parsed if not o.is_hydra_override()]
        with read_write(self.hydra):  # the two hydra values that differ between the points
            self.hydra.hydra.overrides.task = [o.input_line for o in task]
            dirname = self.hydra.hydra.job.config.override_dirname
            self.hydra.hydra.job.override_dirname = get_overrides_dirname(
                overrides=task,
                kv_sep=dirname.kv_sep,
                item_sep=dirname.item_sep,
                exclude_keys=dirname.exclude_keys,
            )
        # as HydraConfig.set_config does: the hydra node's own ${...} (e.g. sweep.dir: outputs/${name}) read
        # the point's values
        self.hydra.hydra._set_parent(job)
        hydra_config = HydraConfig.instance()
        before, hydra_config.cfg = hydra_config.cfg, self.hydra
        try:
            plan.resolve(job)
        finally:
            hydra_config.cfg = before
        return job, self.env_set


class Composer:
    """compose(overrides) -> (the point's job config, resolved as its job will see it; hydra.job.env_set)."""

    def __init__(self, config_loader, master_config: DictConfig):
        self.loader, self.master = config_loader, master_config
        self.parser = OverridesParser.create(config_loader=config_loader)
        self.templates: dict[tuple[str, ...], Template | None] = {}  # None: compose with Hydra

    def _plain(self, o: Override) -> bool:
        """A value Hydra sets after composing: `key=value` on a config key, not a config group."""
        return (
            o.type == OverrideType.CHANGE
            and o.package is None
            and not o.is_hydra_override()
            and not self.loader.repository.group_exists(o.key_or_group.replace(".", "/"))
        )

    def hydra(self, overrides: list[str]) -> tuple[DictConfig, dict]:
        """The point as Hydra composes it."""
        return _point(self.loader.load_sweep_config(self.master, overrides))

    def __call__(self, overrides: list[str]) -> tuple[DictConfig, dict]:
        parsed = self.parser.parse_overrides(overrides)
        is_plain = [self._plain(o) for o in parsed]
        plain = [o for o, yes in zip(parsed, is_plain) if yes]
        key = tuple(o.input_line for o, yes in zip(parsed, is_plain) if not yes)
        if key not in self.templates:
            # errors in the point's overrides surface as Hydra words them
            sweep_config = self.loader.load_sweep_config(self.master, overrides)
            theirs = _point(sweep_config)
            if not plain:  # Hydra composed exactly this point: nothing to check
                self.templates[key] = Template(sweep_config, self.master)
                return theirs
            template = Template(self.loader.load_sweep_config(self.master, list(key)), self.master)
            try:
                same = _container(template.point(parsed, plain)) == _container(theirs)
            except Exception:  # noqa: BLE001 - any failure of the copy here means: use Hydra's way
                same = False
            if not same:
                log.warning(
                    "pre-flight: composing %s by copying gave another config than Hydra's; points with "
                    "these overrides are composed by Hydra (slower, same result)",
                    " ".join(key) or "the sweep's config",
                )
            self.templates[key] = template if same else None
            return theirs
        template = self.templates[key]
        return self.hydra(overrides) if template is None else template.point(parsed, plain)


def _point(sweep_config: DictConfig) -> tuple[DictConfig, dict]:
    env_set = dict(sweep_config.hydra.job.env_set)
    return plan.job_config(sweep_config), env_set


def _container(point: tuple[DictConfig, dict]) -> tuple[dict, dict]:
    return OmegaConf.to_container(point[0]), point[1]
