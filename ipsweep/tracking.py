"""W&B: one run per job, offline by default. The local record is the source of truth, so a W&B
failure (bad key, unreachable server) is logged as a warning and never stops or loses a result."""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from ipsweep.errors import ConfigError

log = logging.getLogger(__name__)


def _safe(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.run is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the dashboard must never cost a result
            log.warning("W&B %s failed (%s); the local record is unaffected", method.__name__, e)
            return None

    return wrapper


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


@functools.cache
def reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to the W&B server be opened within `timeout` s? (wandb.init alone waits ~95 s.)"""
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout
        ).close()
        return True
    except OSError:
        return False


def online_mode(logger_cfg) -> str:
    """The W&B mode to use: `online` falls back to `offline` (one warning per process) when the server is
    unreachable and logger.on_no_network=offline; with `fail` it raises ConfigError."""
    if logger_cfg.mode != "online" or reachable(wandb_server()):
        return logger_cfg.mode
    if logger_cfg.on_no_network == "fail":
        raise ConfigError(
            f"logger.mode=online but the W&B server {wandb_server()} cannot be reached (3 s); fix: check the "
            "network or WANDB_BASE_URL, or logger.mode=offline and upload later with `ipsweep sync`"
        )
    _warn_offline()
    return "offline"


@functools.cache
def _warn_offline() -> None:
    log.warning(
        "W&B server %s cannot be reached: logging offline instead (logger.on_no_network=offline); upload "
        "later "
        "with `ipsweep sync <sweep dir>`",
        wandb_server(),
    )


def _run_config(cfg) -> dict:
    """The job's config, with `setting` and `model` as their names (filterable) and their full configs
    beside."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data["setting_config"], data["model_config"] = data.pop("setting"), data.pop("model")
    return {**data, "setting": cfg.setting.name, "model": cfg.model.name}


class Tracker:
    """One W&B run per ipsweep run folder: its id is the run's signature plus a hash of the folder (the same
    config trained in two sweep dirs is two trainings, so two W&B runs). Extending a run to more epochs
    resumes that W&B run and logs only the epochs it has not logged yet."""

    def __init__(self, cfg, *, signature: str, prompt, run_dir, epochs: int):
        self.run = None
        if cfg.logger.backend == "none" or cfg.logger.mode == "disabled":
            return
        mode = online_mode(cfg.logger)
        from ipsweep.cache import digest

        try:
            import wandb

            self.run = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=cfg.name,
                job_type=prompt.condition,
                name=f"{cfg.setting.name}-{prompt.name}-s{cfg.train.seed}",
                id=f"{signature}-{digest(str(Path(run_dir).resolve()))[:6]}",
                resume="allow",
                reinit="create_new",
                mode=mode,
                dir=str(run_dir),
                config=_run_config(cfg),
                tags=[
                    cfg.setting.name,
                    prompt.name,
                    prompt.condition,
                    f"seed{cfg.train.seed}",
                    *cfg.logger.tags,
                ],
            )
            # top-level keys to filter and group by in the W&B UI
            self.run.config.update(
                {
                    "signature": signature,
                    "prompt": prompt.name,
                    "role": prompt.role,
                    "condition": prompt.condition,
                    "seed": cfg.train.seed,
                    "epochs": epochs,
                },
                allow_val_change=True,
            )
            self.run.define_metric("epoch")
            self.run.define_metric("eval/*", step_metric="epoch")
            self.run.define_metric("train/loss", step_metric="epoch")
            self.run.define_metric("train/global_step")
            self.run.define_metric("train/step_loss", step_metric="train/global_step")
        except Exception as e:  # noqa: BLE001 - the dashboard must never cost a result
            log.warning("W&B init failed (%s); continuing without it, results are still recorded locally", e)
            self.run = None
        self.max_samples = cfg.logger.samples_per_epoch

    @_safe
    def log_epoch(self, epoch: int, entry: dict, samples: dict[str, list[dict]], first_step: int = 0) -> None:
        """One epoch's evaluations (x-axis: epoch) and its per-step training losses (x-axis: global step)."""
        import wandb

        for i, loss in enumerate(entry.get("losses") or []):
            self.run.log({"train/global_step": first_step + i + 1, "train/step_loss": loss})
        data = {"epoch": epoch}
        if "loss" in entry:
            data["train/loss"] = entry["loss"]
        for test_prompt, ev in entry["evals"].items():
            for metric, r in ev["metrics"].items():
                data[f"eval/{test_prompt}/{metric}"] = r["rate"]
        for test_prompt, rows in samples.items():
            rows = rows[: self.max_samples]
            if rows:
                cols = list(rows[0])
                data[f"samples/{test_prompt}"] = wandb.Table(
                    columns=cols, data=[[r[c] for c in cols] for r in rows]
                )
        self.run.log(data)

    @_safe
    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    @_safe
    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _typed(df):
    """A W&B table keeps numbers as numbers: only columns that mix types (or hold None) become strings."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
    return out


def sweep_project(sweep_dirs) -> str | None:
    """The W&B project the sweep's jobs logged to (from its multirun.yaml), so the analysis lands beside
    them."""
    for d in sweep_dirs:
        path = Path(d) / "multirun.yaml"
        if path.is_file():
            project = OmegaConf.select(OmegaConf.load(path), "logger.project")
            if project:
                return str(project)
    return None


def log_analysis(result, *, project: str, mode: str, entity: str | None = None) -> str | None:
    """Log an Analysis's tables (typed) and plots as the sweep's one W&B analysis run (job_type=analysis, in
    the sweep's group). Its id is fixed by the output folder, so analysing again updates that run."""
    if mode == "disabled":
        return None
    try:
        import wandb

        from ipsweep.cache import digest

        group = result.records[0].get("sweep")
        run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            job_type="analysis",
            name=f"{group}-analysis",
            id=f"analysis-{digest(str(Path(result.out_dir).resolve()))}",
            resume="allow",
            mode=mode,
            dir=str(result.out_dir),
            reinit="create_new",
        )
        # the per-item and per-metric frames are for local analysis: W&B gets the summary tables
        tables = {k: v for k, v in result.tables.items() if k not in ("items", "tidy", "groups")}
        run.log(
            {
                **{
                    f"analysis/{k}": wandb.Table(dataframe=_typed(v))
                    for k, v in tables.items()
                    if not v.empty
                },
                **{f"plots/{k}": wandb.Image(str(v)) for k, v in result.plots.items()},
            }
        )
        run.finish()
        return run.dir
    except Exception as e:  # noqa: BLE001 - the local report is the result
        log.warning("W&B logging of the analysis failed (%s); the local report is unaffected", e)
        return None
