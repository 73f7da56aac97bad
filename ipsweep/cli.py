"""The `ipsweep` console script: prepare models, analyze a sweep."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ipsweep.errors import ConfigError


def _prepare(args) -> None:
    from ipsweep import models

    print(f"embedded model: {models.prepare_embedded()}")
    if args.tiny:
        print(f"tiny test model: {models.prepare_tiny_random()}")


def _analyze(args) -> None:
    from ipsweep.analysis import analyze

    result = analyze(args.sweep_dir, args.out)
    cols = ["setting", "arm", "epoch", "seeds", "behaviour_metric", "behaviour", "behaviour_ci", "behaviour_k/n",
            "capability_metric", "capability", "capability_ci", "capability_k/n"]
    print(result["table"][cols].to_markdown(index=False, floatfmt=".2f"))
    if not result["effects"].empty:
        print()
        print(result["effects"].to_markdown(index=False, floatfmt=".2f"))
    wandb_runs = sorted(Path(args.sweep_dir).glob("runs/*/wandb/offline-run-*"))
    print(f"\nreport: {result['report']}\nplot:   {result['plot']}\ntables: {result['out_dir']}/conditions.csv, tidy.csv, tidy.parquet, effects.csv")
    print(f"W&B offline runs: {len(wandb_runs)} under {args.sweep_dir}/runs/*/wandb/ (upload: wandb sync <dir>)")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="ipsweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the embedded GGUF model to a cached safetensors folder (once)")
    p.add_argument("--tiny", action="store_true", help="also build the tiny random test model")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("analyze", help="tables, plot and report.md from a sweep dir's run records")
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR/analysis)")
    p.set_defaults(func=_analyze)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"ipsweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
