"""The `ipsweep` console script: prepare models, screen prompts, follow, analyze and sync a sweep."""

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
    from ipsweep.analysis import analyze, report
    from ipsweep.tracking import log_analysis

    result = analyze(
        args.sweep_dir, args.out, skip_damaged=args.skip_damaged, elicitation_from=args.elicitation
    )

    print(report.summary(result.tables))
    not_done = result.not_done
    if not_done:
        print(f"\n{len(not_done)} run(s) not done, left out of every table:")
        for r in not_done:
            err = r.get("error") or {}
            print(
                f"  {r['status']}: {r['run_dir']}/record.json"
                + (f" ({err.get('type')}: {err.get('message')})" if err else "")
            )
    from ipsweep.tracking import sweep_project

    log_analysis(
        result,
        project=args.project or sweep_project(args.sweep_dir) or "ipsweep",
        mode=args.wandb_mode,
        entity=args.entity,
    )
    wandb_runs = [r for d in args.sweep_dir for r in sorted(Path(d).glob("runs/*/wandb/offline-run-*"))]
    print(
        f"\nreport: {result.report}\nplots:  {', '.join(p.name for p in result.plots.values())}\n"
        f"tables: {result.out_dir}/{{{','.join(n for n in result.tables if n != 'by_test_prompt')}}}.csv"
    )
    print(
        f"W&B offline runs: {len(wandb_runs)} under "
        f"{' '.join(d + '/runs/*/wandb/' for d in args.sweep_dir)} (upload: ipsweep sync <sweep dir>)"
    )


def _sweep_dir(path: str) -> Path:
    from ipsweep import plan, store

    sweep = Path(path)
    if not (store.is_sweep_dir(sweep) or (sweep / plan.MANIFEST).is_file()):
        raise ConfigError(
            f"'{path}' is not a sweep dir (no runs/ and no {plan.MANIFEST}); "
            "fix: pass the folder a sweep wrote, e.g. outputs/<name>"
        )
    return sweep


def _status(args) -> None:
    from ipsweep.status import sweep_status

    table = sweep_status(_sweep_dir(args.sweep_dir))
    if args.state:
        table = table[table.state.isin(args.state)]
    if table.empty:
        print("no points" + (f" in state {', '.join(args.state)}" if args.state else ""))
        return
    print(table.to_markdown(index=False))
    print("\n" + ", ".join(f"{n} {s}" for s, n in table.state.value_counts().items()))


def _sync(args) -> None:
    import subprocess

    runs = sorted(str(p) for p in _sweep_dir(args.sweep_dir).glob("**/wandb/offline-run-*"))
    if not runs:
        print(f"no offline W&B runs under {args.sweep_dir}")
        return
    cmd = [
        str(Path(sys.executable).with_name("wandb")),
        "sync",
        "--skip-synced",
        *(["--dry-run"] if args.dry_run else []),
        *(["-p", args.project] if args.project else []),
        *(["-e", args.entity] if args.entity else []),
        *runs,
    ]
    print(
        f"{'would sync' if args.dry_run else 'syncing'} {len(runs)} offline W&B runs (already synced ones "
        "are skipped)",
        flush=True,
    )
    from ipsweep.tracking import reachable, wandb_server

    if not args.dry_run and not reachable(wandb_server()):
        raise ConfigError(
            f"the W&B server {wandb_server()} cannot be reached from this machine (3 s); fix: run "
            "`ipsweep sync` where there is network (copy the sweep dir there); the local runs are untouched"
        )
    try:
        code = subprocess.run(cmd, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"wandb sync did not finish in {args.timeout} s; fix: check the network, or raise --timeout; "
            "runs already uploaded are skipped when you rerun"
        ) from None
    if code != 0:
        raise ConfigError(
            "wandb sync failed (see its message above); fix: `wandb login` on a machine with network, "
            "then rerun `ipsweep sync`; the local runs are untouched"
        )


# conf/, RESULTS.md and docs/results belong to the checkout an editable install points at (README, "Layout")
CHECKOUT = Path(__file__).resolve().parent.parent


def compose(overrides: list[str]):
    """The job config as launch.py would compose it, from Hydra-style overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ipsweep.config import register

    register()
    conf = CHECKOUT / "conf"
    if not (conf / "config.yaml").is_file():
        raise ConfigError(
            f"no Hydra configs at {conf}: `ipsweep screen` composes the configs of an ipsweep checkout, "
            "like launch.py; fix: install ipsweep from a clone (`pip install -e .`, as the README does)"
        )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose("config", overrides=["store_dir=unused", *overrides])


def _screen(args) -> None:
    from ipsweep import screen
    from ipsweep.config import ESTIMATORS

    cfg = compose(args.overrides)
    table = screen.screen(cfg, surface=not args.no_surface_check)
    out = Path(args.out or f"outputs/screen/{cfg.setting.name}-{cfg.model.name}")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "elicitation.csv", index=False)
    png = screen.plot(
        table, f"{cfg.setting.name} on {cfg.model.name}: elicitation strength", out / "elicitation.png"
    )
    cols = [
        c
        for c in [
            "prompt",
            "role",
            "sampled",
            "sampled_lo",
            "sampled_hi",
            "behaviour_with_prompt",
            "logprob",
            "logprob_lo",
            "logprob_hi",
            "logprob_surface_shift",
            "logprob_surface_flag",
            "logprob_train",
            "logprob_train_surface_shift",
            "logprob_train_surface_flag",
        ]
        if c in table
    ]
    print(table[cols].to_markdown(index=False, floatfmt=".3f"))
    ests = [e for e in ESTIMATORS if e in table]
    for i, a in enumerate(ests):
        for b in ests[i + 1 :]:
            agree = screen.agreement(table, a, b)
            if agree and "undefined" in agree:
                print(f"\nagreement {a} vs {b}: undefined ({agree['undefined']})")
            elif agree:
                print(
                    f"\nagreement {a} vs {b}: Spearman {agree['spearman']:+.2f} [{agree['lo']:+.2f}, "
                    f"{agree['hi']:+.2f}] "
                    f"(permutation p={agree['p']:.3f}, {agree['prompts']} prompts)"
                )
    for est in (e for e in ("logprob", "logprob_train") if f"{e}_surface_flag" in table):
        flagged = table.prompt[table[f"{est}_surface_flag"]].tolist()
        print(
            f"{est}: {len(flagged)} prompt(s) move by more than {screen.FLAG_SHARE:.0%} of the inoculation "
            "prompts' "
            "spread when only their letter case or punctuation "
            f"changes{': ' + ', '.join(flagged) if flagged else ''}"
        )
    print(f"table: {out / 'elicitation.csv'}\nplot:  {png}")


def _power(args) -> None:
    from ipsweep.analysis import power

    lines = [
        "planning a sweep at 80% power, alpha 0.05 (Fisher z for correlations; two proportions for effects):",
        f"- with {args.prompts} IP prompts: smallest detectable correlation r = "
        f"{power.smallest_correlation(args.prompts):.2f}; "
        f"power for r = {args.r}: {power.correlation_power(args.r, args.prompts):.2f}; "
        f"prompts needed for r = {args.r}: {power.points_needed(args.r)}",
        f"- with {args.items} eval items and a control behaviour rate of {args.control_rate}: smallest "
        "detectable effect "
        f"{power.smallest_effect(args.control_rate, args.items):.2f}; items needed for an effect of "
        f"{args.effect}: "
        f"{power.items_needed(args.control_rate, args.effect)}",
        "  (one seed; seed-to-seed variation in the effect adds to this: run 3 or more seeds and read the "
        "seed part",
        "  of the interval in a pilot's effects.csv)",
    ]
    print("\n".join(lines))


def _results(args) -> None:
    from ipsweep import results

    if not results.RESULTS_MD.is_file():
        raise ConfigError(
            f"no RESULTS.md at {results.RESULTS_MD}: `ipsweep results` maintains the committed results of "
            "an ipsweep checkout; fix: run it from an install of a clone (`pip install -e .`)"
        )
    if args.export:
        sweep, name = args.export
        n = results.export(sweep, results.RESULTS_DIR / name)
        print(
            f"exported {n} run records to {results.RESULTS_DIR / name}/runs; now: ipsweep analyze "
            f"{results.RESULTS_DIR / name} --out {results.RESULTS_DIR / name}/analysis --wandb-mode disabled"
        )
        return
    if args.check:
        stale = results.stale_blocks()
        if stale:
            raise ConfigError(
                f"RESULTS.md disagrees with the committed CSVs in {len(stale)} table(s): {'; '.join(stale)}; "
                "fix: run `ipsweep results` and commit"
            )
        print("RESULTS.md agrees with the committed CSVs")
        return
    print(f"RESULTS.md: {results.update()} tables regenerated from {results.RESULTS_DIR}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    parser = argparse.ArgumentParser(prog="ipsweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare", help="convert the embedded GGUF model to a cached safetensors folder (once)"
    )
    p.add_argument("--tiny", action="store_true", help="also build the tiny random test model")
    p.set_defaults(func=_prepare)
    p = sub.add_parser(
        "analyze", help="tables, plots and report.md from the run records of one or more sweep dirs"
    )
    p.add_argument(
        "sweep_dir", nargs="+", help="one sweep dir, or several (e.g. one per setting; needs --out) to pool"
    )
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR/analysis)")
    p.add_argument(
        "--elicitation",
        nargs="+",
        default=None,
        metavar="CSV",
        help="take elicitation estimates from `ipsweep screen` tables (elicitation.csv) instead of the runs",
    )
    p.add_argument(
        "--skip-damaged",
        action="store_true",
        help="analyse without run records that are damaged (listed in the report) instead of refusing",
    )
    p.add_argument(
        "--wandb-mode",
        default="offline",
        choices=["offline", "online", "disabled"],
        help="log the tables and plots to W&B in the sweep's group (default: offline)",
    )
    p.add_argument(
        "--project",
        "--wandb-project",
        dest="project",
        default=None,
        help="W&B project (default: the sweep's logger.project, else ipsweep)",
    )
    p.add_argument("--entity", "--wandb-entity", dest="entity", default=None, help="W&B entity")
    p.set_defaults(func=_analyze)
    p = sub.add_parser(
        "power",
        help="plan a sweep: the smallest effect and correlation it can detect, and what a target needs",
    )
    p.add_argument("--prompts", type=int, default=11, help="IP-style prompts (points of the correlation)")
    p.add_argument("--items", type=int, default=60, help="eval items per arm")
    p.add_argument(
        "--control-rate", type=float, default=0.85, help="the control's behaviour rate (from a pilot)"
    )
    p.add_argument("--r", type=float, default=0.57, help="target correlation (default: the paper's 0.57)")
    p.add_argument("--effect", type=float, default=0.22, help="target effect b(control) - b(IP)")
    p.set_defaults(func=_power)
    p = sub.add_parser(
        "results", help="regenerate RESULTS.md's tables from the analysis CSVs committed in docs/results"
    )
    p.add_argument("--check", action="store_true", help="only check that RESULTS.md agrees with the CSVs")
    p.add_argument(
        "--export",
        nargs=2,
        metavar=("SWEEP_DIR", "NAME"),
        help="copy a sweep's run records (metrics only) to docs/results/NAME/runs, to commit",
    )
    p.set_defaults(func=_results)
    p = sub.add_parser(
        "screen", help="rank a setting's prompts by elicitation strength on the base model (no training)"
    )
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. setting=gcd_sycophancy model=hf model.path=..."
    )
    p.add_argument("--out", default=None, help="output folder (default: outputs/screen/<setting>-<model>)")
    p.add_argument(
        "--no-surface-check",
        action="store_true",
        help="skip re-estimating each prompt upper-cased, lower-cased and without punctuation",
    )
    p.set_defaults(func=_screen)
    p = sub.add_parser(
        "status", help="every point of a sweep: done / running / requeued / interrupted / failed / pending"
    )
    p.add_argument("sweep_dir")
    p.add_argument(
        "--state",
        nargs="*",
        choices=["done", "running", "requeued", "interrupted", "failed", "corrupt", "pending"],
        help="show only these states",
    )
    p.set_defaults(func=_status)
    p = sub.add_parser("sync", help="upload a sweep's offline W&B runs (from a machine with network)")
    p.add_argument("sweep_dir")
    p.add_argument(
        "--project", "--wandb-project", dest="project", default=None, help="override the W&B project"
    )
    p.add_argument("--entity", "--wandb-entity", dest="entity", default=None, help="override the W&B entity")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
    p.add_argument("--timeout", type=int, default=600, help="seconds to allow `wandb sync` (default 600)")
    p.set_defaults(func=_sync)
    args = parser.parse_args(argv)
    from hydra.errors import ConfigCompositionException

    try:
        args.func(args)
    except (ConfigError, ConfigCompositionException) as e:
        print(f"ipsweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
