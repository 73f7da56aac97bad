"""Every sweep point's config as Hydra's `load_sweep_config` composes it, at the cost of a copy.

Hydra composes each point from scratch (~0.2 s: defaults tree, YAML, merges), which made the pre-flight of a
thousand-point sweep take minutes. Points of one sweep mostly differ in plain values (`train.seed=3`), which
Hydra applies after composing, onto a config the values do not change. So a point's config is composed once
per distinct set of its other overrides (config groups such as `setting=...`, appends, deletions, `hydra.*`)
and each point's plain values are applied to a copy, as Hydra applies them. The first point of every such
set is also composed by Hydra and compared; on any difference that set falls back to Hydra's composition.
"""

from __future__ import annotations

import copy
import logging

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Composer:
    def __init__(self, config_loader, master_config: DictConfig):
        self.loader, self.master = config_loader, master_config
        self.parser = OverridesParser.create(config_loader=config_loader)
        self.templates: dict[tuple[str, ...], DictConfig | None] = {}  # None: compose with Hydra

    def _plain(self, o: Override) -> bool:
        """A value Hydra sets after composing: `key=value` on a config key, not a config group."""
        return (
            o.type == OverrideType.CHANGE
            and o.package is None
            and not o.is_hydra_override()
            and not self.loader.repository.group_exists(o.key_or_group.replace(".", "/"))
        )

    def __call__(self, overrides: list[str]) -> DictConfig:
        parsed = self.parser.parse_overrides(overrides)
        is_plain = [self._plain(o) for o in parsed]
        plain = [o for o, yes in zip(parsed, is_plain) if yes]
        key = tuple(o.input_line for o, yes in zip(parsed, is_plain) if not yes)
        if key not in self.templates:
            template = self.loader.load_sweep_config(self.master, list(key))
            if not plain:  # Hydra composed exactly this point: nothing to check
                self.templates[key] = template
                return self._apply(template, parsed, plain)
            cfg = self._apply(template, parsed, plain)
            hydra = self.loader.load_sweep_config(self.master, overrides)
            same = OmegaConf.to_container(cfg) == OmegaConf.to_container(hydra)
            if not same:
                log.warning(
                    "pre-flight: composing %s by copying gave another config than Hydra's; points with "
                    "these overrides are composed by Hydra (slower, same result)",
                    " ".join(key) or "the sweep's config",
                )
            self.templates[key] = template if same else None
            return hydra
        template = self.templates[key]
        if template is None:
            return self.loader.load_sweep_config(self.master, overrides)
        return self._apply(template, parsed, plain)

    def _apply(self, template: DictConfig, parsed: list[Override], plain: list[Override]) -> DictConfig:
        """What load_sweep_config does with the plain values, on a copy of the composed template."""
        cfg = copy.deepcopy(template)
        ConfigLoaderImpl._apply_overrides_to_config(plain, cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in task]
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task,
            kv_sep=dirname.kv_sep,
            item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys,
        )
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        return cfg
