"""The `ipsweep` sweeper: Hydra's basic sweeper, plus a pre-flight check of every point and a manifest.

Before the first job starts, every point's config is composed and planned (prompts, data files,
model path, signature). Any bad point stops the sweep with one message that lists each problem and
its fix, so nothing fails at hour 20. The points are then added to SWEEP_DIR/sweep.json, which
`ipsweep status` reads. With `dry_run` (`python launch.py -m ... --dry-run`) it prints the plan and,
for a SLURM launcher, the sbatch script, and launches nothing.
"""

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.ipsweep_plugins.compose import Composer
from hydra_plugins.ipsweep_plugins.launchers import LocalGpusLauncher, SlurmLauncher, require_slurm
from ipsweep import cost, memory, plan, status
from ipsweep.errors import ConfigError, SweepFailed
from ipsweep.tracking import online_mode

log = logging.getLogger(__name__)


@dataclass
class IpsweepSweeperConf:
    _target_: str = "hydra_plugins.ipsweep_plugins.sweeper.IpsweepSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    dry_run: bool = False
    # the pre-flight composes and checks every point before any job: a larger sweep asks for this raised
    max_points: int = 2000


ConfigStore.instance().store(
    group="hydra/sweeper", name="ipsweep", node=IpsweepSweeperConf, provider="ipsweep"
)


@contextmanager
def _job_env(env_set):
    before = dict(os.environ)
    os.environ.update({str(k): str(v) for k, v in env_set.items()})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def _requests_gpus(launcher) -> bool:
    """Whether a SLURM launcher config asks for GPUs (gpus_per_node, gpus_per_task, or a gpu gres)."""
    extra = dict(launcher.get("additional_parameters") or {})
    gres = " ".join(str(v) for v in [launcher.get("gres"), extra.get("gres"), extra.get("gpus")] if v)
    return bool(
        launcher.get("gpus_per_node") or launcher.get("gpus_per_task") or extra.get("gpus") or "gpu" in gres
    )


class IpsweepSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        dry_run: bool = False,
        max_points: int = 2000,
    ):
        super().__init__(max_batch_size, params)
        self.dry_run = dry_run
        self.max_points = max_points
        self._states: dict[int, str] = {}  # the state of each point whose job has run, by number

    def preflight(self, jobs: list[list[str]]) -> list[dict]:
        """Plan every point; raise one ConfigError that lists every bad one."""
        points, problems = [], {}
        compose, settings = Composer(self.hydra_context.config_loader, self.config), {}
        for num, overrides in enumerate(jobs):
            try:
                cfg, env_set = compose(list(overrides))
                with _job_env(env_set):  # e.g. HF_HUB_OFFLINE, as the job will see it
                    point = plan.entry(num, filter_overrides(overrides), cfg, plan.plan(cfg, settings))
                if isinstance(self.launcher, LocalGpusLauncher) and (refused := self.launcher.problems(cfg)):
                    raise ConfigError("; ".join(refused))  # what a job on one of its slots cannot run
                point["config"] = OmegaConf.to_container(cfg)
                points.append(point)
            except Exception as e:  # noqa: BLE001 - composition errors come in several types; all are reported
                problems.setdefault(str(e), []).append(num)
        if problems:
            lines = [f"  job(s) #{', #'.join(map(str, nums))}: {msg}" for msg, nums in problems.items()]
            bad = sum(len(n) for n in problems.values())
            raise ConfigError(
                f"{bad} of {len(jobs)} sweep points are invalid; nothing was launched:\n" + "\n".join(lines)
            )
        return points

    def _refuse_glob_prompts(self, arguments: list[str]) -> None:
        """prompt names come from the setting's library, not a config group: glob() would launch 0 jobs."""
        globbed = [a for a in arguments if a.lstrip("+").startswith("prompt=") and "glob(" in a]
        if not globbed:
            return
        rest = [a for a in arguments if a not in globbed]
        names = ""
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(
                self.config, [a for a in rest if "," not in a]
            )
            names = ",".join(["none", *cfg.setting.prompts])
        except Exception:  # noqa: BLE001 - the message still names the fix without the list
            pass
        raise ConfigError(
            f"{globbed[0]}: prompt names come from the setting's prompt library, not a config group, so "
            f"glob() matches nothing; fix: list them, e.g. prompt={names or 'none,<name>,...'}"
        )

    def sweep(self, arguments: list[str]) -> Any:
        self._refuse_glob_prompts(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        # The in-process launcher runs one job at a time anyway: hand it one job per batch, so the sweep can
        # say after each job how far it is. Other launchers (SLURM arrays, pools) get the whole sweep at once.
        in_process = isinstance(self.launcher, BasicLauncher)
        self.overrides = self.split_arguments(
            overrides, 1 if in_process and self.max_batch_size is None else self.max_batch_size
        )
        self._pin_device()
        if isinstance(self.launcher, LocalGpusLauncher):
            self.launcher.check_options()
        jobs = [job for batch in self.overrides for job in batch]
        if len(jobs) > self.max_points:
            raise ConfigError(
                f"this sweep has {len(jobs):,} points, more than hydra.sweeper.max_points="
                f"{self.max_points:,}: the pre-flight composes and checks every one before any job starts, "
                "which takes long at this size, and each is a training; fix: "
                f"hydra.sweeper.max_points={len(jobs)} to go on (try --dry-run first), or sweep fewer values"
            )
        points = self.preflight(jobs)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        plan.refuse_unattested(plan.primary_test(points))  # a prediction git cannot attest: before anything
        if self.dry_run:
            self._print_plan(points, sweep_dir)
            return []
        if isinstance(self.launcher, (SlurmLauncher, LocalGpusLauncher)):  # points of one run: one task
            self.launcher.runs = {p["num"]: (p["run_dir"], p["epochs"]) for p in points}
        if isinstance(self.launcher, SlurmLauncher):
            require_slurm()  # before the sweep dir or manifest is written
        if isinstance(self.launcher, LocalGpusLauncher) and self.launcher.gpu_slots():
            # jobs that share a GPU must fit it together (ConfigError otherwise, before any job starts)
            memory.report(points, self.config.hydra.launcher, self.launcher.jobs_per_gpu, refuse=True)
        for logger in {json.dumps(p["config"]["logger"], sort_keys=True) for p in points}:
            logger = json.loads(logger)
            if logger["backend"] == "wandb":
                online_mode(OmegaConf.create(logger))  # fail now, or warn once that the jobs log offline
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        manifest = [{k: v for k, v in p.items() if k != "config"} for p in points]
        plan.write_manifest(sweep_dir, manifest, plan.primary_test(points), plan.comparisons(points))
        already = {p["num"] for p in manifest if status.point_state(p)["state"] == "done"}
        returns, initial_job_idx, start = [], 0, time.time()
        while not self.is_done():
            batch = self.get_job_batch()
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            initial_job_idx += len(batch)
            returns.append(results)
            if not self.is_done():
                log.info(
                    self._progress(manifest[:initial_job_idx], already, len(manifest), time.time() - start)
                )
        summary, failed = self._summary(manifest, already)
        log.info(summary)
        if failed:  # every job ran; the records say why each failed
            raise SweepFailed(summary)
        return returns

    def _pin_device(self) -> None:
        """SLURM jobs run on other nodes than the one that plans them: `model.device=auto` is resolved here,
        from the GPUs the launcher requests, so the pre-flight's signatures (which hold the device kind) are
        the jobs' own."""
        if not isinstance(self.launcher, SlurmLauncher) or self.config.model.get("device", "auto") != "auto":
            return
        kind = "cuda" if _requests_gpus(self.config.hydra.launcher) else "cpu"
        for batch in self.overrides:
            for job in batch:
                if not any(o.lstrip("+~").startswith("model.device=") for o in job):
                    job.append(f"model.device={kind}")

    def _progress(self, ran: list[dict], already: set, total: int, elapsed: float) -> str:
        """After each job: how many of the sweep's points are done, skipped, failed, and an ETA. A point whose
        job has run keeps its state for the rest of the sweep: a record is read once, not after each job."""
        for p in ran:
            if p["num"] not in self._states:
                self._states[p["num"]] = status.point_state(p)["state"]
        states = [self._states[p["num"]] for p in ran]
        skipped = sum(1 for p, st in zip(ran, states) if st == "done" and p["num"] in already)
        trained = sum(1 for p, st in zip(ran, states) if st == "done" and p["num"] not in already)
        failed = sum(st in ("failed", "interrupted", "corrupt") for st in states)
        per_job = elapsed / max(trained + failed, 1)
        # an upper bound: points that turn out to be done already cost ~nothing
        eta = per_job * (total - len(ran))
        return (
            f"sweep progress: {len(ran)}/{total} points ({trained} done, {skipped} skipped, {failed} "
            "failed); "
            f"{elapsed / 60:.1f} min so far, ETA {eta / 60:.0f} min"
        )

    @staticmethod
    def _summary(manifest: list[dict], already: set) -> tuple:
        """One line per outcome: done (and how many were skipped as already done), failed with their records,
        interrupted, still pending (e.g. queued with wait=false)."""
        states: dict[str, list] = {}
        for p in manifest:
            state = status.point_state(p)["state"]
            states.setdefault("skipped" if state == "done" and p["num"] in already else state, []).append(p)
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(states.items()))
        lines = [f"sweep finished: {counts} (of {len(manifest)} points)"]
        bad = [(k, p) for k in ("failed", "interrupted", "corrupt") for p in states.get(k, [])]
        lines += [f"  {k}: job #{p['num']} {Path(p['run_dir']) / 'record.json'}" for k, p in bad]
        if bad:
            lines.append(
                "  details: ipsweep status <sweep dir> --state failed interrupted; rerunning the sweep "
                "resumes them"
            )
        return "\n".join(lines), bool(bad)

    def _print_plan(self, points: list[dict], sweep_dir: Path) -> None:
        rows, done_epochs = [], {}
        for p in points:
            state = status.point_state(p)
            done_epochs[p["run_dir"]] = state["epochs_done"]
            rows.append(
                {
                    "job": p["num"],
                    "overrides": " ".join(p["overrides"]) or "(none)",
                    "run": Path(p["run_dir"]).name,
                    "epochs": p["epochs"],
                    "now": state["state"]
                    + (f" ({state['detail']})" if state["state"] == "pending" and state["detail"] else ""),
                }
            )
        trainings = len({p["run_dir"] for p in points})
        print(f"dry run: {len(points)} jobs ({trainings} trainings) into {sweep_dir}; nothing launched")
        print(status.table(rows))
        limit = self.config.hydra.launcher.get("timeout_min") if hasattr(self.launcher, "render") else None
        print("\n" + cost.estimate(points, done_epochs, cost.measured_rates(sweep_dir), limit))
        jobs_per_gpu = getattr(self.launcher, "jobs_per_gpu", 1)
        lines, _ = memory.report(points, self.config.hydra.launcher, jobs_per_gpu)
        print("memory per job (an estimate on a GPU: ipsweep/memory.py):\n" + "\n".join(lines))
        print(f"\nlauncher: {self.config.hydra.launcher._target_.rsplit('.', 1)[-1]}")
        if hasattr(self.launcher, "render"):
            print(
                f"sbatch script for the array ({trainings} tasks: points that share a run run in one task, "
                f"the one with the most epochs first):\n{self.launcher.render(trainings)}"
            )
        print("resolved config of job #0 (`python launch.py <overrides> --cfg job` shows any one):")
        print(OmegaConf.to_yaml(points[0]["config"]))
