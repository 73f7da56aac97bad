"""The machine's cache and content digests: where prepared models, file digests and cached results live, how
JSON is written there (atomically) and read back (a damaged file is absent), and how data and files are
hashed into keys.

Ground floor: it imports nothing from ipsweep. The run's identity (identity.py), the run records (store.py),
the model sources (models.py), the settings' data files (settings/base.py) and the elicitation and judge
caches build on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import cache
from pathlib import Path

from filelock import FileLock
from platformdirs import user_cache_dir


def root() -> Path:
    """The per-user ipsweep cache (`IPSWEEP_CACHE` overrides it): models/, digests/, elicitation/."""
    return Path(os.environ.get("IPSWEEP_CACHE") or user_cache_dir("ipsweep"))


def models_dir() -> Path:
    """Where prepared models live."""
    return root() / "models"


def digest(data) -> str:
    """A short sha256 of JSON-able `data` (keys sorted): run signatures and cache keys."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@cache
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """A file version's sha256, read from the on-disk cache or computed once and written there: every job of a
    sweep is its own process, and re-hashing a 7B model's weights in each read ~16 GB a job."""
    key = hashlib.sha256(f"{path.resolve()}\0{size}\0{mtime_ns}".encode()).hexdigest()[:32]
    cached = root() / "digests" / key
    if cached.is_file():
        return cached.read_text()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    value = h.hexdigest()[:16]
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{key}.{os.getpid()}")  # jobs racing to write it write the same text
    partial.write_text(value)
    partial.replace(cached)
    return value


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, computed once per file version (path, size and modification time) on this
    machine's cache (`digests/`) and kept per process."""
    st = Path(path).stat()
    return _digest(Path(path), st.st_size, st.st_mtime_ns)


def atomic_write_json(path: Path, data) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    # mkstemp makes it 0600; results are as readable as any file the user writes
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path):
    """A JSON file (cache entry, manifest) that does not parse is treated as absent, never as a result."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, RecursionError):
        return None


def cached_json(path: Path, compute):
    """The JSON cache entry at `path`, or `compute()` written there; concurrent processes compute it once (a
    lock file beside it)."""
    with FileLock(str(path) + ".lock"):
        hit = read_json(path)
        if hit is None:
            hit = compute()
            atomic_write_json(path, hit)
    return hit
