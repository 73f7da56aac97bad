"""Launchers built on hydra-submitit-launcher, selected as `hydra/launcher=slurm` or `local_gpus`.

- ipsweep_slurm: hydra-submitit-launcher's SLURM launcher (one job array per sweep) plus `wait`.
  With wait=false the sweep returns as soon as sbatch has queued the array, so a dropped login shell
  loses nothing; the jobs write their own records and `ipsweep status` follows them.
- ipsweep_local_gpus: submitit's local executor behind a bounded pool (submitit_local alone starts
  every job at once). Each slot is one GPU, repeated `jobs_per_gpu` times, and a job sees only its
  slot's GPU (CUDA_VISIBLE_DEVICES). With no GPU, the slots are the machine's cores divided by
  `cpus_per_job`, and each job's thread pools are capped to its share. Where jobs share a GPU, each
  one's vLLM engine takes its share of it (ENGINES_SHARE / jobs on the GPU); model.device_map=auto, which
  needs a job that sees several GPUs, is refused before launch.

Both run the points that share a run (`train.epochs=2,1`, a PTST point on the control's run) as one task, the
longest first, so no job waits on another's run while holding a GPU. Both requeue a task that receives the
timeout/preemption signal (submitit's checkpoint), and the requeued task resumes from its last checkpoint
(the run record knows which).
"""

import logging
import math
import os
import queue
import shlex
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import open_dict, read_write

from ipsweep.errors import ConfigError

log = logging.getLogger(__name__)
# Of a GPU that k local_gpus jobs share, what their vLLM engines may take together: each engine asks for
# ENGINES_SHARE / k (eval.vllm.gpu_memory_utilization, its default 0.85 is for a GPU of its own). vLLM refuses
# to start where the GPU's free memory is below the share it asks for; a co-tenant holds at most 1/k (its
# engine's share, or its training, which the memory check fits in 1/k), and the rest is the CUDA contexts.
ENGINES_SHARE = 0.9


def gpu_share(tenants: int) -> float:
    """Each vLLM engine's share of a GPU `tenants` jobs share (rounded down: together <= ENGINES_SHARE)."""
    return math.floor(ENGINES_SHARE / tenants * 1000) / 1000


@dataclass
class SlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.ipsweep_plugins.launchers.SlurmLauncher"
    wait: bool = True  # false: return once the array is queued


@dataclass
class LocalGpusConf(LocalQueueConf):
    _target_: str = "hydra_plugins.ipsweep_plugins.launchers.LocalGpusLauncher"
    gpus: list[str] | None = None  # GPU ids to use (indices, UUIDs or MIG ids); null = every visible GPU
    jobs_per_gpu: int = 1  # small jobs can share a GPU
    cpus_per_job: int = 1  # CPU-only machines: concurrent jobs = cores // cpus_per_job
    max_jobs: int | None = None  # a further cap on concurrent jobs
    signal_delay_s: int = 120  # USR2 this long before timeout_min: the job is requeued and resumes
    max_num_timeout: int = 3


ConfigStore.instance().store(group="hydra/launcher", name="ipsweep_slurm", node=SlurmConf, provider="ipsweep")
ConfigStore.instance().store(
    group="hydra/launcher", name="ipsweep_local_gpus", node=LocalGpusConf, provider="ipsweep"
)


def require_slurm() -> None:
    """A real submission needs SLURM's client commands; say so before anything is written."""
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise ConfigError(
            f"hydra/launcher=slurm needs SLURM, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH on this machine; "
            "fix: launch from a login node of the cluster (or add SLURM's bin folder to PATH), "
            "or preview the sweep here with --dry-run"
        )


class Task:
    """The sweep points that share one run, in one job: the point with the most epochs first, then the others,
    which find their epochs trained and only add their evaluations (a PTST prompt, a shorter epochs value), on
    the adapters of the model they load. So no job waits on another's run while it holds a GPU. A requeued
    task runs its points again: the finished ones skip."""

    def __init__(self, launcher: "_Launcher"):
        self.launcher = launcher

    def __call__(self, points: list[tuple]) -> list[JobReturn]:
        return [self.launcher(*point) for point in points]

    def checkpoint(self, points: list[tuple]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, points)


class _Launcher(BaseSubmititLauncher):
    """hydra-submitit-launcher's job callable and checkpoint (requeue), with submission split out."""

    _OWN_KEYS: tuple[str, ...] = ()

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for key in self._OWN_KEYS:
            setattr(self, key, self.params.pop(key))
        # job number -> (run folder, epochs), from the sweeper's pre-flight: points of one run form a task
        self.runs: dict[int, tuple[str, int]] = {}

    def tasks(self, params: list[tuple]) -> list[list[tuple]]:
        """The points grouped by the run they share (a point's own number where the sweeper said nothing),
        each group the longest first; groups in the order of their first point."""
        groups: dict[str, list[tuple]] = {}
        for p in params:
            groups.setdefault(self.runs.get(p[2], (f"#{p[2]}", 0))[0], []).append(p)
        return [sorted(g, key=lambda p: -self.runs.get(p[2], ("", 0))[1]) for g in groups.values()]

    def _executor_params(self) -> dict:
        """Resource settings for submitit; unset (null) ones are left to the cluster's defaults."""
        return {
            k: v
            for k, v in self.params.items()
            if k not in ("submitit_folder", "max_num_timeout") and v is not None
        }

    def _job_params(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[tuple]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            out.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        return out


class SlurmLauncher(_Launcher):
    _EXECUTOR = "slurm"
    _OWN_KEYS = ("wait",)

    def executor(self, preview: bool = False):
        """The configured submitit executor, built as hydra-submitit-launcher builds it.

        `preview`: only to render the sbatch script, which is text and needs no SLURM, so that a dry run
        works on a laptop; submitit otherwise refuses to build a SLURM executor where `srun` is missing."""
        from unittest import mock

        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        if not preview:
            require_slurm()
        with (
            mock.patch.object(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
            if preview
            else nullcontext()
        ):
            executor = submitit.AutoExecutor(
                cluster="slurm",
                folder=self.params["submitit_folder"],
                slurm_max_num_timeout=self.params["max_num_timeout"],
            )
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in generic else f"slurm_{k}": v for k, v in self._executor_params().items()}
        )
        return executor

    def render(self, n_jobs: int) -> str:
        """The sbatch script this launcher would submit for an array of n_jobs tasks."""
        slurm = self.executor(preview=True)._executor
        # what map_array sets: renders as --array=0-<n-1>%<parallelism>
        slurm.parameters["map_count"] = n_jobs
        return slurm._make_submission_file_text("python -u -m submitit.core._submit <folder>", "<uid>")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        executor = self.executor()
        tasks = self.tasks(self._job_params(job_overrides, initial_job_idx))
        jobs = executor.map_array(Task(self), tasks)
        log.info(
            "submitted %d points as %d tasks, SLURM array %s",
            len(job_overrides),
            len(jobs),
            jobs[0].job_id.split("_")[0],
        )
        if self.wait:
            done = {p[2]: r for task, j in zip(tasks, jobs) for p, r in zip(task, j.results()[0])}
            return [done[i] for i in range(initial_job_idx, initial_job_idx + len(job_overrides))]
        sweep_dir = self.config.hydra.sweep.dir
        log.info("not waiting (hydra.launcher.wait=false); follow with: ipsweep status %s", sweep_dir)
        queued = {p[2]: (p[0], j.job_id) for task, j in zip(tasks, jobs) for p in task}
        return [
            JobReturn(
                overrides=queued[i][0], status=JobStatus.COMPLETED, _return_value=f"queued as {queued[i][1]}"
            )
            for i in range(initial_job_idx, initial_job_idx + len(job_overrides))
        ]


class LocalGpusLauncher(_Launcher):
    _EXECUTOR = "local"
    _OWN_KEYS = ("gpus", "jobs_per_gpu", "cpus_per_job", "max_jobs")
    tenants = 1  # the most jobs on one GPU at once (launch sets it; the jobs carry it)

    def check_options(self) -> None:
        """The launcher's own options, before any point is planned (a dry run included): each bad one with
        its fix."""
        bad = []
        if self.jobs_per_gpu < 1:
            bad.append(f"jobs_per_gpu={self.jobs_per_gpu} gives a GPU no job; fix: 1 or more")
        if self.cpus_per_job < 1:
            bad.append(f"cpus_per_job={self.cpus_per_job} gives a job no core; fix: 1 or more")
        if self.max_jobs is not None and self.max_jobs < 1:
            bad.append(f"max_jobs={self.max_jobs} allows no job; fix: 1 or more, or null (no cap)")
        if self.gpus is not None:
            ids = [str(g) for g in self.gpus]
            if twice := sorted({g for g in ids if ids.count(g) > 1}):
                bad.append(
                    f"gpus lists {', '.join(twice)} more than once (the memory check counts each GPU once); "
                    "fix: list each GPU once and set jobs_per_gpu for jobs that share one"
                )
        if bad:
            raise ConfigError("hydra/launcher=local_gpus: " + "; ".join(bad))

    @staticmethod
    def _visible() -> list[str]:
        """The GPUs this machine shows jobs: CUDA_VISIBLE_DEVICES's entries, else torch's indices."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [g.strip() for g in visible.split(",") if g.strip()]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]

    def problems(self, cfg) -> list[str]:
        """What a job of point config `cfg` cannot run on one of this launcher's slots (the sweeper's
        pre-flight asks, before any job and in a dry run)."""
        if cfg.model.get("device_map"):
            return [
                f"model.device_map={cfg.model.device_map} spreads the model over the GPUs a job sees, and "
                "a hydra/launcher=local_gpus job sees one (its slot's); fix: drop model.device_map (for a "
                "model that does not fit one GPU: train.gradient_checkpointing=true or "
                "model.quantization=4bit), "
                "or give one job several GPUs: hydra/launcher=slurm with hydra.launcher.gpus_per_node=<n>, "
                "or hydra/launcher=local (in-process: the job sees every visible GPU)"
            ]
        return []

    def engine_share(self, cfg) -> float | None:
        """eval.vllm.gpu_memory_utilization for a job of `cfg` on a GPU `tenants` jobs share: at most
        ENGINES_SHARE / tenants, so that the co-tenants' engines fit the GPU together; None where the
        configured share stands (an unshared GPU, the HF engine, a share already that small)."""
        if self.tenants < 2 or cfg.eval.get("engine") != "vllm":
            return None
        share = gpu_share(self.tenants)
        return share if cfg.eval.vllm.gpu_memory_utilization > share else None

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict,
    ) -> JobReturn:
        """The job, as BaseSubmititLauncher.__call__ runs it, its config given its vLLM engine's share of a
        shared GPU (eval.vllm is not in a run's identity: the run and its records are the same)."""
        import submitit

        Singleton.set_state(singleton_state)
        setup_globals()
        config = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with open_dict(config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            config.hydra.job.num = job_num
        share = self.engine_share(config)
        if share is not None:
            log.info(
                "%d jobs share this GPU: the vLLM engine takes eval.vllm.gpu_memory_utilization=%s of it, "
                "not %s",
                self.tenants,
                share,
                config.eval.vllm.gpu_memory_utilization,
            )
            with read_write(config.eval.vllm):
                config.eval.vllm.gpu_memory_utilization = share
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=config,
            job_dir_key=job_dir_key,
            job_subdir_key="hydra.sweep.subdir",
        )

    def gpu_slots(self) -> bool:
        """Whether the slots are GPUs (not a CPU-only machine's cores)."""
        return self.slots()[0] is not None

    def slots(self) -> list[str | None]:
        """One entry per concurrent job: its GPU id as CUDA_VISIBLE_DEVICES takes it (an index, a GPU-... UUID
        or a MIG-... id, as SLURM or a user gives them), or None on a CPU-only machine."""
        gpus = self._visible() if self.gpus is None else [str(g) for g in self.gpus]
        slots = [g for g in gpus for _ in range(self.jobs_per_gpu)] or [None] * max(
            1, (os.cpu_count() or 1) // self.cpus_per_job
        )
        return slots[: self.max_jobs] if self.max_jobs else slots

    def _executor_for(self, gpu: str | None, threads: int):
        import submitit

        executor = submitit.LocalExecutor(
            folder=self.params["submitit_folder"], max_num_timeout=self.params["max_num_timeout"]
        )
        params = {
            k: v
            for k, v in self._executor_params().items()
            if k in ("timeout_min", "signal_delay_s", "stderr_to_stdout")
        }
        # Each job's thread pools get its share of the cores (GPU slots too: tokenisation and scoring run on
        # the CPU).
        params["setup"] = [f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"]
        if gpu is not None:  # submitit's visible_gpus takes indices only; CUDA_VISIBLE_DEVICES takes any id
            params["setup"].append(f"export CUDA_VISIBLE_DEVICES={shlex.quote(gpu)}")
        executor.update_parameters(**params)
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        slots = self.slots()
        threads = self.cpus_per_job if slots[0] is None else max(1, (os.cpu_count() or 1) // len(slots))
        self.tenants = 1 if slots[0] is None else max(Counter(slots).values())
        free: queue.Queue = queue.Queue()
        for s in slots:
            free.put(s)
        log.info(
            "local_gpus: %d jobs, at most %d at once (%s)",
            len(job_overrides),
            len(slots),
            "GPUs " + ",".join(map(str, sorted(set(slots))))
            if slots[0] is not None
            else f"{self.cpus_per_job} CPU(s) each",
        )
        if self.tenants > 1:
            log.info(
                "local_gpus: up to %d jobs share a GPU; a vLLM engine (eval.engine=vllm) takes at most %s of "
                "it (eval.vllm.gpu_memory_utilization)",
                self.tenants,
                gpu_share(self.tenants),
            )

        def one(task: list[tuple]) -> list[JobReturn]:
            slot = free.get()
            try:
                return self._executor_for(slot, threads).submit(Task(self), task).results()[0]
            except Exception as e:  # noqa: BLE001 - a job killed from outside (OOM killer, kill -9): the sweep goes on
                return [JobReturn(overrides=p[0], status=JobStatus.FAILED, _return_value=e) for p in task]
            finally:
                free.put(slot)

        tasks = self.tasks(self._job_params(job_overrides, initial_job_idx))
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            done = {p[2]: r for task, rs in zip(tasks, pool.map(one, tasks)) for p, r in zip(task, rs)}
        return [done[i] for i in range(initial_job_idx, initial_job_idx + len(job_overrides))]
