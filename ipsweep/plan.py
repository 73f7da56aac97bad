"""What one sweep point will do, worked out from its config before anything heavy runs.

`plan(cfg)` resolves the prompts, reads and checks the setting's data and the model's path, and
computes the run's signature and folder. The job calls it first; the sweeper calls it for every
point before the first job starts, so bad input fails the whole sweep up front. The sweep's
manifest (sweep.json) lists every point a sweep dir was asked to run: `ipsweep status` reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock
from omegaconf import OmegaConf

from ipsweep import models, prompts, store
from ipsweep.errors import ConfigError
from ipsweep.settings.base import Setting, build
from ipsweep.validate import check_sizes, check_values

MANIFEST = "sweep.json"


@dataclass
class Point:
    prompt: prompts.Prompt  # the point's prompt (the sweep axis)
    run_prompt: prompts.Prompt  # the prompt its run trains with: NO_PROMPT for the control and PTST
    extra: list[prompts.Prompt]  # test prompts beyond the headline one (extra_test_prompts, test_grid)
    test_prompts: list[prompts.Prompt]
    headline: str
    inputs: dict  # content digests of the data files and model weights (part of the signature)
    signature: str
    run: store.Run
    setting: Setting


def require_values(cfg) -> None:
    """Mandatory values (??? in the YAML) must be set; say which, before anything resolves them."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"no value for {', '.join(missing)} (??? in the config); fix: set it on the command line, "
            f"e.g. {missing[0]}=<value>"
        )


def plan(cfg) -> Point:
    """Raises ConfigError naming the problem and the fix; loads no model."""
    require_values(cfg)
    check_values(cfg)
    placement = cfg.get("prompt_placement")
    prompt = prompts.configure(
        prompts.resolve(cfg.setting, cfg.prompt), cfg.train.prompt_mode, placement, cfg.setting.name
    )
    extra = [prompts.resolve(cfg.setting, n) for n in cfg.eval.extra_test_prompts]
    if cfg.eval.test_grid:
        own = [prompt] if prompt.condition == "ip" else []
        extra += own + [p for p in prompts.library(cfg.setting).values() if p.role == "safety"]
    # an IP run: its own prompt's; the control (and PTST): every library prompt's, as baselines
    if cfg.eval.leak_tests:
        sources = (
            [prompt]
            if prompt.condition == "ip"
            else [
                prompts.configure(p, "fixed", placement, cfg.setting.name)
                for p in prompts.library(cfg.setting).values()
            ]
        )
        extra += [leak for p in sources for leak in prompts.leak_prompts(p)]
    setting = build(cfg.setting)  # reads and checks the data files
    if placement == "replace_preamble" and not setting.preamble:
        raise ConfigError(
            f"prompt_placement=replace_preamble, but setting '{cfg.setting.name}' has no instruction of its "
            "own to replace; fix: use user_prefix, user_suffix or system"
        )
    check_sizes(cfg, setting)
    models.check(cfg.model)
    headline = prompt.test_prompt
    # the control's run is shared by placements: a moved PTST prompt is its own evaluation
    if headline and headline.moved:
        headline = replace(headline, name=f"{headline.name}@{headline.placement}")
    test_prompts = list({p.name: p for p in [prompts.NO_PROMPT, *filter(None, [headline]), *extra]}.values())
    # a PTST point is the control's run, tested with its prompt
    run_prompt = prompt.train_prompt or prompts.NO_PROMPT
    digests = store.inputs(cfg, setting)
    signature = store.digest(store.semantic_config(cfg, run_prompt, digests))
    run = store.Run(
        Path(cfg.store_dir) / "runs" / f"{cfg.setting.name}-{run_prompt.name}-s{cfg.train.seed}-{signature}"
    )
    return Point(
        prompt,
        run_prompt,
        extra,
        test_prompts,
        (headline or prompts.NO_PROMPT).name,
        digests,
        signature,
        run,
        setting,
    )


def job_config(sweep_config):
    """A sweep point's config, resolved as its job will see it, without the `hydra` node."""
    from hydra.core.hydra_config import HydraConfig

    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    hydra_config.set_config(sweep_config)  # so ${hydra:...} resolves to this point's values
    try:
        job = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        require_values(job)
        return OmegaConf.create(OmegaConf.to_container(job, resolve=True))
    finally:
        hydra_config.cfg = before


def entry(num: int, overrides: list[str], cfg, point: Point) -> dict:
    return {
        "num": num,
        "overrides": list(overrides),
        "run_dir": str(point.run.dir),
        "signature": point.signature,
        "setting": cfg.setting.name,
        "prompt": point.prompt.name,
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "test_prompts": [t.name for t in point.test_prompts],
        "base": bool(cfg.eval.base),
        "inputs": point.inputs,
    }


def write_manifest(sweep_dir: str | Path, points: list[dict]) -> Path:
    """Add these points to the sweep's manifest (a rerun or an extended sweep keeps the earlier ones)."""
    path = Path(sweep_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        old = store.read_json(path) or {"points": []}

        def key(p: dict) -> tuple:
            return p["run_dir"], p["epochs"], p["prompt"]  # control and PTST share a run

        keyed = {key(p): p for p in old["points"]}
        taken = {p["num"] for p in old["points"]}
        launched = time.strftime("%Y-%m-%dT%H:%M:%S")
        for p in points:
            p = {**p, "launched": launched}
            if key(p) in keyed:  # the same point asked again keeps its number
                p["num"] = keyed[key(p)]["num"]
            elif p["num"] in taken:  # a later sweep into this dir: numbers go on from the last one
                p["num"] = max(taken) + 1
            taken.add(p["num"])
            keyed[key(p)] = {**keyed.get(key(p), {}), **p}
        store.atomic_write_json(
            path, {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "points": list(keyed.values())}
        )
    return path


def read_manifest(sweep_dir: str | Path) -> list[dict]:
    """The manifest's points, with each run folder found from the sweep dir, so that `ipsweep status` works
    from any working directory (the manifest stores paths as the sweep was launched)."""
    data = store.read_json(Path(sweep_dir) / MANIFEST)
    points = data["points"] if data else []
    for p in points:
        here = Path(sweep_dir) / "runs" / Path(p["run_dir"]).name
        if here.is_dir() or not Path(p["run_dir"]).is_dir():
            p["run_dir"] = str(here)
    return points
