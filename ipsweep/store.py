"""Result records on disk: one JSON file per run, in a folder named by the run's signature (identity.py),
written atomically; reading them back, typed for a job and as checked JSON for the analysis."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from ipsweep.cache import atomic_write_json
from ipsweep.record import Record


def code_version() -> dict:
    """ipsweep's version and, when it runs from a git checkout, the commit (with -dirty for uncommitted
    changes)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        out = {"ipsweep": version("ipsweep")}
    except PackageNotFoundError:  # run from a checkout on the path, not installed (a bare GPU image)
        out = {"ipsweep": "not installed"}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            out["commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


class DamagedRecord(Exception):
    """A run record that exists but does not parse or lacks what every record has."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _read_record(path: Path) -> tuple[Record, dict] | None:
    """The record at `path`, typed and as parsed JSON (checked once, for both readers); None if there is
    none; DamagedRecord if it does not parse or lacks what every record has."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DamagedRecord(path, f"not valid JSON ({e})") from None
    try:
        return Record.model_validate(data), data
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise DamagedRecord(path, f"not a run record ({problems})") from None


def load_record(path: Path) -> Record | None:
    """The typed record at `path` (a job's and `ipsweep status`'s view); see _read_record."""
    read = _read_record(path)
    return read and read[0]


class Run:
    """The folder of one run (record.json, checkpoints/, samples/, wandb/) or of one cached evaluation."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.record_path = self.dir / "record.json"

    @contextmanager
    def lock(self):
        """Jobs that share a signature (e.g. train.epochs=1,2) take turns; the later one reuses the earlier's
        epochs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dir / ".lock")):
            yield

    def is_locked(self) -> bool:
        """True while a job works on this run (the lock dies with its process, even on kill -9)."""
        from filelock import Timeout

        try:
            with FileLock(str(self.dir / ".lock"), timeout=0):
                return False
        except Timeout:
            return True

    def load(self) -> Record | None:
        """The record, None if there is none yet; raises DamagedRecord if it is damaged."""
        return load_record(self.record_path)

    def set_aside(self) -> Path:
        """Move a damaged record out of the way (kept, never overwritten); returns where it went."""
        dest = self.record_path.with_name(f"record.damaged-{time.strftime('%Y%m%dT%H%M%S')}.json")
        os.replace(self.record_path, dest)
        return dest

    def save(self, record: Record) -> None:
        record.updated = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.record_path, record.dump())

    def write_samples(self, epoch: int, test_prompt: str, samples: list[dict]) -> Path:
        path = self.dir / "samples" / f"epoch{epoch}_{test_prompt}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
        os.replace(tmp, path)
        return path


def scan(store_dir: str | Path) -> tuple[list[dict], list[DamagedRecord]]:
    """Every run record under a sweep dir, as checked JSON (the analysis works on its tables), and the
    damaged ones."""
    good, damaged = [], []
    for p in sorted(Path(store_dir).glob("runs/*/record.json")):
        try:
            good.append(_read_record(p)[1])
        except DamagedRecord as e:
            damaged.append(e)
    return good, damaged


def records(store_dir: str | Path) -> list[dict]:
    """Every valid run record under a sweep dir (damaged ones: see scan)."""
    return scan(store_dir)[0]


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "runs").is_dir()
