"""Shared by the benchmarks: where they run, peak memory, and where results go.

Each benchmark prints a Markdown table and writes the same numbers, with the machine and the exact
command, to benchmarks/results/<name>-<device>.json; BENCHMARKS.md quotes those files.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "launch.py")]  # as a user runs a sweep
# tests write elsewhere
RESULTS = Path(os.environ.get("IPSWEEP_BENCH_RESULTS", ROOT / "benchmarks" / "results"))

# Dense bf16 peak (FLOP/s) for MFU; unknown GPUs report no MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_tag() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_rss_gb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children), in GB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1e6  # ru_maxrss is in KB on Linux


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of a command run from the repo root; on failure, exit with its stderr."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


class Timer:
    def __enter__(self):
        sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.s = time.perf_counter() - self.start


def save(name: str, rows: list[dict], **extra) -> Path:
    """Print `rows` as a table and write them with the context needed to reproduce them."""
    import pandas as pd
    import torch
    import transformers

    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))
    for k, v in extra.items():
        if not isinstance(v, (list, dict)):  # long series go to the file only
            print(f"{k}: {v}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{device_tag()}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": name,
                "command": "python " + " ".join(sys.argv),
                "device": device(),
                "date": time.strftime("%Y-%m-%d"),
                "host": platform.node(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "rows": rows,
                **extra,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    print(f"written: {path}")
    return path


MODEL_HELP = (
    "a model config name (smollm2_135m, tiny_random, ...) or the model overrides a job takes, quoted: "
    "'model=hf model.path=/models/qwen2-1.5b model.name=qwen2-1.5b'"
)


def model_overrides(model: str) -> list[str]:
    """`--model` as Hydra overrides: a config name, or `model=hf model.path=...` as a job takes it."""
    return model.split() if "=" in model else [f"model={model}"]


def compose(*overrides: str):
    """The resolved ipsweep config, composed exactly as launch.py composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ipsweep.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=["logger=none", *overrides])
