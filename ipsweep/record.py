"""The run record: what one run trained and measured, as it is stored in record.json.

A job changes a record only through these methods; readers get it from `store` (typed for a job,
checked JSON for the analysis). Every key a job writes is declared here (tests/test_store.py checks the
committed records hold no other); fields that old records may lack have defaults, and extra keys are kept,
so a record written by an earlier ipsweep still loads. `dump` writes what was set and nothing else: a
default that was never set does not appear in the file.
"""

from __future__ import annotations

import os
import platform
import time
import traceback

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")

    def dump(self) -> dict:
        """As stored: the fields that were set (read or assigned), none of the unset defaults."""
        return self.model_dump(mode="json", exclude_unset=True)


class Evaluation(_Open):
    """One trained (or untrained) model scored under one test prompt."""

    metrics: dict[str, dict]
    by_group: list = Field(default_factory=list)
    items: list = Field(default_factory=list)
    # how it was made: engine and version, dtype, decoding, stop tokens, chat template, adapter scored
    protocol: dict | None = None

    @classmethod
    def of(cls, result: dict) -> Evaluation:
        """The stored part of evaluate()'s result (the samples go to samples/)."""
        return cls(
            metrics=result["metrics"],
            by_group=result["by_group"],
            items=result["items"],
            **({"protocol": result["protocol"]} if result.get("protocol") else {}),
        )


class Epoch(_Open):
    """A trained epoch (or "0", the untrained model, which has only evaluations)."""

    evals: dict[str, Evaluation] = Field(default_factory=dict)
    loss: float | None = None
    steps: int = 0
    losses: list = Field(default_factory=list)
    checkpoint: str | None = None
    train_s: float | None = None
    eval_s: float | None = None
    # [micro-batch, gradient accumulation] where out-of-memory made training use a smaller micro-batch
    micro_batch: list[int] | None = None
    # the optimizer step a mid-epoch checkpoint (train.save_steps) resumed this epoch from; train_s then
    # counts this attempt's part of the epoch
    resumed_from_step: int | None = None


class Attempt(_Open):
    """Where one attempt ran and logged: a requeued or rerun job adds one more."""

    started: str
    start_s: float
    host: str | None = None
    pid: int | None = None
    log: str | None = None
    job_id: str | None = None
    resumed_from_epoch: int = 0
    end_s: float | None = None
    cuda_visible_devices: str | None = None
    torch_threads: int | None = None
    # the accelerator (models.device_info: kind, and on a GPU its name, capability, how many are visible)
    device: dict | None = None

    @classmethod
    def here(cls, **where) -> Attempt:
        """This process, now; `where` adds what only the caller knows (device, threads, log, job id)."""
        return cls(
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            start_s=round(time.time(), 3),
            host=platform.node(),
            pid=os.getpid(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            **where,
        )


class Record(_Open):
    """One run: its identity (signature, config), its epochs and their evaluations, its attempts."""

    signature: str
    setting: str
    prompt: str
    role: str
    condition: str
    seed: int
    model: str
    status: str
    behaviour_metric: str
    capability_metric: str
    config: dict  # the semantic config (identity.semantic_config), whose digest is the signature
    epochs: dict[str, Epoch]
    # the run's training prompt as inserted ("" for the control and PTST), how it is drawn (fixed, mixed),
    # a mixed run's bank of texts (train.paraphrases; unset: all), where it goes and, when the sweep moved it
    # off the setting's own placement (prompt_placement), that placement again
    prompt_text: str | None = None
    prompt_mode: str | None = None
    paraphrases: int | None = None
    placement: str | None = None
    placement_override: str | None = None
    sweep: str | None = None  # the sweep's name (cfg.name)
    run_dir: str | None = None
    updated: str | None = None  # when the record was last saved
    # python, torch, transformers, peft, ipsweep and its commit of the latest attempt
    versions: dict | None = None
    n_train: int | None = None  # training examples
    # a mixed run: its texts and which one each training example had (drawn with train.seed)
    prompt_draws: dict | None = None
    stop_token_ids: list[int] | None = None  # where generation ends a reply (lm.stop_token_ids)
    # training replies cut at train.max_length: how many, of how many, at what length
    train_cut: dict | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    error: dict | None = None
    # roles of the test prompts evaluated: a control tested with a safety prompt is the PTST arm
    test_prompt_roles: dict[str, str] = Field(default_factory=dict)
    target_epochs: int = 0
    timings: dict = Field(default_factory=dict)
    elicitation: dict | None = None
    # the vLLM adapter gate, per epoch ("0": the untrained model): agreement with HF+peft, adapter applied
    engine_checks: dict[str, dict] = Field(default_factory=dict)
    wandb_logged_epochs: list[int] = Field(default_factory=list)
    # setting.flawed_share < 1: the share, how many examples were trained flawed and clean, the draw's seed
    flawed: dict | None = None
    # an IP run: how many distinct prompt texts its training examples got (1 fixed; up to K mixed)
    prompt_texts_trained: int | None = None
    # legacy: early signature-v3 records name their headline test prompt (always "none" once PTST reused the
    # control's run); no longer written
    headline_test_prompt: str | None = None

    def trained_epochs(self) -> list[int]:
        return sorted(int(k) for k in self.epochs if k != "0")

    def last_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def checkpoints(self) -> dict[int, str]:
        """The saved adapter of each trained epoch (training resumes after the last)."""
        return {e: self.epochs[str(e)].checkpoint for e in self.trained_epochs()}

    def missing_evals(self, epochs: int, test_prompts: list[str], base: bool) -> dict[int, list[str]]:
        """Per epoch (0 = untrained, when `base`), the test prompts not evaluated yet; an epoch not
        trained yet lists all of them."""
        wanted = ([0] if base else []) + list(range(1, epochs + 1))
        have = {e: self.epochs[str(e)].evals if str(e) in self.epochs else {} for e in wanted}
        out = {e: [t for t in test_prompts if t not in have[e]] for e in wanted}
        return {e: m for e, m in out.items() if m}

    def start_attempt(self, attempt: Attempt, test_prompt_roles: dict[str, str], epochs: int, **info) -> None:
        """A job takes the record up: status running, the attempt appended, `info` (versions, run_dir)
        replaced."""
        attempt.resumed_from_epoch = max(self.trained_epochs(), default=0)
        self.attempts = [*self.attempts, attempt]
        self.test_prompt_roles = {**self.test_prompt_roles, **test_prompt_roles}
        self.status, self.error = "running", None
        self.target_epochs = max(epochs, self.target_epochs)
        for key, value in info.items():
            setattr(self, key, value)

    def add_epoch(self, epoch: int, entry: Epoch) -> None:
        self.epochs[str(epoch)] = entry

    def add_evaluation(self, epoch: int, test_prompt: str, evaluation: Evaluation) -> None:
        """Add an evaluation to an epoch (creating epoch 0, the untrained model, on first use)."""
        self.epochs.setdefault(str(epoch), Epoch(evals={})).evals[test_prompt] = evaluation

    def add_timing(self, **seconds: float) -> None:
        self.timings = {**self.timings, **{k: round(v, 3) for k, v in seconds.items()}}

    def mark_logged(self, epoch: int) -> None:
        self.wandb_logged_epochs = [*self.wandb_logged_epochs, epoch]

    def steps_before(self, epoch: int) -> int:
        """Optimizer steps of the epochs before `epoch` (where its W&B steps start)."""
        return sum(self.epochs[str(e)].steps for e in range(1, epoch) if str(e) in self.epochs)

    def finish(self) -> None:
        self.status = "done"
        self.attempts[-1].end_s = round(time.time(), 3)

    def interrupt(self, error: BaseException) -> None:
        """Preempted, timed out or Ctrl-C: not a failure; a rerun resumes after the last epoch."""
        self.status = "interrupted"
        self.error = {"type": type(error).__name__, "message": "interrupted", "log": self._log()}

    def fail(self, error: BaseException) -> None:
        self.status = "failed"
        self.error = {
            "type": type(error).__name__,
            "message": str(error),
            "traceback": traceback.format_exc(limit=20),
            "log": self._log(),
        }

    def _log(self) -> str | None:
        return self.attempts[-1].log if self.attempts else None

    def headline_rates(self, epochs: int, headline: str) -> list[dict]:
        """Behaviour and capability rate at each epoch 1..epochs under the point's headline test prompt."""
        out = []
        for e in range(1, epochs + 1):
            metrics = self.epochs[str(e)].evals[headline].metrics
            out.append(
                {
                    "epoch": e,
                    "behaviour": metrics[self.behaviour_metric]["rate"],
                    "capability": metrics[self.capability_metric]["rate"],
                }
            )
        return out
