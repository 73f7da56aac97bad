"""What one sweep point will do, worked out from its config before anything heavy runs.

`plan(cfg)` resolves the prompts, reads and checks the setting's data and the model's path, and
computes the run's signature and folder. The job calls it first; the sweeper calls it for every
point before the first job starts, so bad input fails the whole sweep up front. The sweep's
manifest (sweep.json) lists every point a sweep dir was asked to run: `ipsweep status` reads it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError

from ipsweep import cache, identity, memory, models, prompts, store
from ipsweep.errors import ConfigError
from ipsweep.settings.base import Setting, build, flawed_share
from ipsweep.validate import check_sizes, check_values

MANIFEST = "sweep.json"
PREDICTION = "prediction.csv"  # the frozen screen table of a declared prediction (primary.screen)


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


def point_prompt(cfg) -> prompts.Prompt:
    """The point's prompt from the setting's library, as it will be trained (train.prompt_mode,
    train.paraphrases, prompt_placement); its `train_prompt` is what the run's training rows hold."""
    return prompts.configure(
        prompts.resolve(cfg.setting, cfg.prompt),
        cfg.train.prompt_mode,
        cfg.get("prompt_placement"),
        cfg.setting.name,
        cfg.train.get("paraphrases"),
    )


def plan(cfg, settings: dict | None = None) -> Point:
    """Raises ConfigError naming the problem and the fix; loads no model. `settings`: the settings built so
    far, by their config (a sweep's pre-flight plans many points of one setting; each is built once)."""
    require_values(cfg)
    check_values(cfg)
    placement = cfg.get("prompt_placement")
    prompt = point_prompt(cfg)
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
        unrelated = prompts.unrelated_prompt(prompts.library(cfg.setting), prompt.name)
        extra += [leak for p in sources for leak in prompts.leak_prompts(p, unrelated)]
    key = json.dumps(OmegaConf.to_container(cfg.setting, resolve=True), sort_keys=True)
    settings = {} if settings is None else settings
    if key not in settings:
        settings[key] = build(cfg.setting)  # reads and checks the data files
    setting = settings[key]
    if placement == "replace_preamble" and not setting.preamble:
        raise ConfigError(
            f"prompt_placement=replace_preamble, but setting '{cfg.setting.name}' has no instruction of its "
            "own to replace; fix: use user_prefix, user_suffix or system"
        )
    check_sizes(cfg, setting)
    if cfg.setting.flawed_share < 1:  # raises where the setting has too few clean replies, naming why
        flawed_share(
            setting,
            cfg.setting.name,
            setting.train_examples()[: cfg.train.n_train],
            cfg.setting.flawed_share,
            cfg.train.seed,
        )
    models.check(cfg.model)
    if cfg.train.method == "lora" and (
        problem := memory.target_problem(cfg.model, cfg.train.lora.target_modules)
    ):
        raise ConfigError(problem)
    headline = prompt.test_prompt
    # the control's run is shared by placements: a moved PTST prompt is its own evaluation
    if headline and headline.moved:
        headline = replace(headline, name=f"{headline.name}@{headline.placement}")
    test_prompts = list({p.name: p for p in [prompts.NO_PROMPT, *filter(None, [headline]), *extra]}.values())
    # a PTST point is the control's run, tested with its prompt
    run_prompt = prompt.train_prompt or prompts.NO_PROMPT
    digests = identity.inputs(cfg, setting)
    signature = identity.signature(cfg, run_prompt, digests)
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
        return resolve(OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"]))
    finally:
        hydra_config.cfg = before


def resolve(job):
    """Resolve a job config in place (${hydra:...} from HydraConfig as it is set); return it."""
    try:
        OmegaConf.resolve(job)
    except InterpolationToMissingValueError:  # say which values are missing (???)
        require_values(job)
        raise
    return job


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
        # sizes, for the dry run's cost estimate
        "n_train": cfg.train.n_train or len(point.setting.train_examples()),  # check_sizes: n_train <= all
        "n_eval": len(point.setting.eval_examples(cfg.eval.n_eval)),
    }


def primary_test(points: list[dict]) -> dict | None:
    """The primary test the sweep's points declare (one for the whole sweep), or None."""
    tests = {json.dumps(p["config"]["primary"], sort_keys=True) for p in points}
    if len(tests) > 1:
        raise ConfigError(
            f"the sweep's points declare {len(tests)} different primary tests; a sweep has one; fix: set "
            "primary.* once for the sweep, not as a swept value"
        )
    test = json.loads(tests.pop()) if tests else None
    return test if test and test["estimator"] else None


def attestation(screen: str | None) -> dict:
    """What git can attest of a declaration made now: the commit checked out where the screen table lives
    (else in the working directory), its time, and whether the tree is that commit (`attested`: no tracked
    file changed, the screen table committed; `why_not` otherwise). A prediction attested this way was in a
    commit older than every run of its sweep: anyone can check the commit's date and contents."""
    where = Path(screen).resolve().parent if screen else Path.cwd()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return {"attested": False, "why_not": f"{where} is not in a git repository"}
    out = {
        "commit": head.stdout.strip(),
        "commit_time": git("show", "-s", "--format=%cI", "HEAD").stdout.strip(),
    }
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()]
    why = None
    if screen and git("ls-files", "--error-unmatch", str(Path(screen).resolve())).returncode:
        why = f"the screen table {screen} is not committed"
    elif changed:
        names = ", ".join(changed[:3])
        why = f"{len(changed)} tracked file(s) differ from commit {out['commit'][:12]}: {names}"
    return {**out, "attested": why is None, **({"why_not": why} if why else {})}


def refuse_unattested(test: dict | None) -> None:
    """A declared prediction (primary.screen) launches only from a clean git tree that holds it, unless
    primary.attest=false says to run it unattested (every table that shows it says so)."""
    if not test or not test.get("screen") or not test.get("attest", True):
        return
    a = attestation(test["screen"])
    if not a["attested"]:
        raise ConfigError(
            f"the declared prediction (primary.screen={test['screen']}) cannot be attested by git: "
            f"{a['why_not']}; fix: commit the screen table and the config it was made with (git add ...; git "
            "commit) and launch again, or set primary.attest=false to run it unattested"
        )


# Keys added to the primary test after sweeps declared it, with the value an older declaration meant.
LATER_KEYS = {"attest": True, "alternative": "two-sided", "alpha": 0.05}


def _same_test(old: dict, new: dict) -> bool:
    """Equal declarations: a key the old one lacks counts as its LATER_KEYS value; `attest` is how the
    declaration was recorded, not what was declared."""
    a, b = {**LATER_KEYS, **old}, {**LATER_KEYS, **new}
    return {k: v for k, v in a.items() if k != "attest"} == {k: v for k, v in b.items() if k != "attest"}


def _declare(old: dict | None, test: dict | None, sweep_dir: Path) -> dict | None:
    """The manifest's primary test: declared once, with the time and how many run records the sweep dir
    already held (0: declared before any training, i.e. pre-registered). Changing it after runs exist is
    refused: choosing the test after seeing results is what declaring it prevents."""
    if test is None or (old and _same_test(old["test"], test)):
        return old
    runs = len(list(Path(sweep_dir).glob("runs/*/record.json")))
    if old and runs:
        raise ConfigError(
            f"this sweep declared its primary test as {old['test']} on {old['declared']}, and {runs} run(s) "
            f"exist; primary={test} would change it after the fact; fix: keep the declared test, or start a "
            "new sweep dir (name=...) for a new primary test"
        )
    declared = {
        "test": test,
        "declared": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs_before": runs,
        **attestation(test.get("screen")),
    }
    if test.get("screen"):  # the prediction: a frozen copy of the screen table, and its hash
        frozen = Path(sweep_dir) / PREDICTION
        shutil.copyfile(test["screen"], frozen)
        declared["screen_sha256"] = hashlib.sha256(frozen.read_bytes()).hexdigest()
    return declared


def comparisons(points: list[dict]) -> list[str]:
    """The contrasts of arms the sweep's points ask the analysis for (`compare`), each once, in order."""
    return list(dict.fromkeys(c for p in points for c in p["config"].get("compare", [])))


def write_manifest(
    sweep_dir: str | Path, points: list[dict], primary: dict | None = None, compare: list[str] = ()
) -> Path:
    """Add these points to the sweep's manifest (a rerun or an extended sweep keeps the earlier ones), the
    primary test the sweep declares (`primary`, see _declare), and the contrasts its analysis computes
    (`compare`, added to the earlier ones)."""
    path = Path(sweep_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        old = cache.read_json(path) or {"points": []}
        declared = _declare(old.get("primary"), primary, Path(sweep_dir))

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
        together = list(dict.fromkeys([*old.get("compare", []), *compare]))
        cache.atomic_write_json(
            path,
            {
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **({"primary": declared} if declared else {}),
                **({"compare": together} if together else {}),
                "points": list(keyed.values()),
            },
        )
    return path


def read_comparisons(sweep_dir: str | Path) -> list[str]:
    """The contrasts of arms the sweep's manifest asks the analysis for."""
    data = cache.read_json(Path(sweep_dir) / MANIFEST)
    return list(data.get("compare", [])) if data else []


def read_primary(sweep_dir: str | Path) -> dict | None:
    """The primary test the sweep's manifest declares, with when (see _declare), and for a prediction its
    frozen screen table (`prediction`, None if missing) and whether that file is what was declared
    (`screen_unchanged`); None if no test was declared."""
    data = cache.read_json(Path(sweep_dir) / MANIFEST)
    primary = data.get("primary") if data else None
    if primary and "screen_sha256" in primary:
        frozen = Path(sweep_dir) / PREDICTION
        digest = hashlib.sha256(frozen.read_bytes()).hexdigest() if frozen.is_file() else None
        primary = {**primary, "prediction": str(frozen) if digest else None}
        primary["screen_unchanged"] = digest == primary["screen_sha256"]
    return primary


def read_manifest(sweep_dir: str | Path) -> list[dict]:
    """The manifest's points, with each run folder found from the sweep dir, so that `ipsweep status` works
    from any working directory (the manifest stores paths as the sweep was launched)."""
    data = cache.read_json(Path(sweep_dir) / MANIFEST)
    points = data["points"] if data else []
    for p in points:
        here = Path(sweep_dir) / "runs" / Path(p["run_dir"]).name
        if here.is_dir() or not Path(p["run_dir"]).is_dir():
            p["run_dir"] = str(here)
    return points
