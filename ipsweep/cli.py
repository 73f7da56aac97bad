"""The `ipsweep` console script: prepare models, screen prompts, follow, analyze and sync a sweep."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
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
        args.sweep_dir,
        args.out,
        skip_damaged=args.skip_damaged,
        elicitation_from=args.elicitation,
        compare=args.compare,
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
    tables = ", ".join(f"{n}.csv" for n in result.tables if n != "by_test_prompt")
    print()
    for line in (
        f"report: {result.report}",
        f"plots:  {', '.join(p.name for p in result.plots.values())} (in {result.out_dir})",
        f"tables: {tables} (in {result.out_dir})",
        f"W&B offline runs: {len(wandb_runs)} under {' '.join(d + '/runs/*/wandb/' for d in args.sweep_dir)} "
        "(upload: ipsweep sync <sweep dir>)",
    ):
        print(
            textwrap.fill(
                line, report.WIDTH, subsequent_indent=" " * 8, break_long_words=False, break_on_hyphens=False
            )
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


# conf/, RESULTS.md and docs/results belong to the checkout an editable install points at (docs/layout.md)
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
    out = Path(args.out or f"outputs/screen/{cfg.setting.name}-{cfg.model.name}")
    table = screen.screen(cfg, surface=not args.no_surface_check, workdir=out / "engine")
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


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of whole numbers, e.g. 2,3,5") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': every value must be at least 1")
    return values


def _pilot(path: str, design: str | None) -> dict:
    """The power-table row of a pilot sweep's analysis (one design and its last epoch)."""
    import pandas as pd

    p = Path(path)
    csv = next((c for c in (p / "power.csv", p / "analysis" / "power.csv") if c.is_file()), None)
    if csv is None:
        raise ConfigError(
            f"no power.csv in '{p}' or '{p / 'analysis'}'; fix: run `ipsweep analyze {p}` first, or pass "
            "the folder it wrote (--out)"
        )
    table = pd.read_csv(csv, dtype={"design": str})
    if design is not None:
        table = table[table.design == design]
    if table.design.nunique() != 1:
        raise ConfigError(
            f"{csv} has {'no' if table.empty else 'several'} designs to plan from"
            f"{'' if design is None else f' matching {design!r}'} (it has: "
            f"{', '.join(pd.read_csv(csv, dtype={'design': str}).design.unique())}); fix: --design KEY"
        )
    row = table.sort_values("epoch").iloc[-1].to_dict()
    if not row["seed_sd_logit"] == row["seed_sd_logit"]:
        raise ConfigError(
            f"the pilot in {csv} could not measure its seed variance (pooling needs the control and at least "
            "two IP arms, each with 2 or more seeds); fix: give the seed sd on the logit scale, --seed-sd"
        )
    return {**row, "source": str(csv)}


def _power(args) -> None:
    from ipsweep.analysis import power

    pilot = _pilot(args.pilot, args.design) if args.pilot else {}
    arms = args.arms or int(pilot.get("ip_prompts") or args.prompts)
    rate = args.control_rate if args.control_rate is not None else pilot.get("control_rate", 0.85)
    seed_sd = args.seed_sd if args.seed_sd is not None else pilot.get("seed_sd_logit", power.SEED_SD)
    items = args.items or sorted({60, 120, 240, int(pilot.get("items", 60))})
    if min(args.seeds) < 2:
        raise ConfigError(
            "--seeds includes 1: with one seed the interval cannot count seed-to-seed variation (items "
            "only), so its power is not what a reviewer can trust; fix: plan with 2 or more seeds"
        )
    if arms < 1 or args.reps < 1 or seed_sd < 0 or args.item_sd < 0:
        raise ConfigError(
            f"--arms {arms}, --reps {args.reps}, --seed-sd {seed_sd}, --item-sd {args.item_sd}: arms and "
            "reps must be at least 1 and the sds at least 0; fix: those flags"
        )
    power.logit_design(rate, args.effect, seed_sd, args.item_sd)  # the rate and effect are possible
    source = f"the pilot {pilot['source']}" if pilot else "flags and defaults"
    if args.seed_sd is None and not pilot:
        source += "; the seed sd is a guess, not measured: a pilot with 2+ seeds measures it (--pilot)"
    print(
        f"planning {arms} IP arm(s) against one control at alpha 0.05: control rate {rate:.2f}, every arm "
        f"an effect of {args.effect}, seed sd {seed_sd:.2f} and item sd {args.item_sd} on the logit scale "
        f"(from {source}); {args.reps} simulated sweeps per row, each analysed as `ipsweep analyze` does "
        "(seed variance pooled over the arms)"
    )
    table = power.plan(arms, args.seeds, items, rate, args.effect, seed_sd, args.item_sd, args.reps)
    table["smallest_effect_80pct"] = [power.detectable(se) for se in table.se]
    print(table.drop(columns="mc_se").to_markdown(index=False, floatfmt=("g", "g", "g", *[".2f"] * 5)))
    print(f"(power's Monte Carlo standard error: at most {table.mc_se.max():.2f})")
    enough = table[table.power >= 0.8].sort_values(["runs", "items"])
    print(
        f"cheapest row with power >= 0.8: {enough.seeds.iloc[0]} seeds x {enough['items'].iloc[0]} items "
        f"({enough.runs.iloc[0]} training runs)"
        if not enough.empty
        else "no row reaches power 0.8: add seeds or items, or plan for a larger effect"
    )
    print(
        f"correlation (Fisher z, 80% power): with {arms} IP prompts the smallest detectable r is "
        f"{power.smallest_correlation(arms):.2f}; power for r = {args.r}: "
        f"{power.correlation_power(args.r, arms):.2f}; prompts needed for r = {args.r}: "
        f"{power.points_needed(args.r)}"
    )


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
        unsourced = results.unsourced_numbers()
        if unsourced:
            raise ConfigError(
                f"RESULTS.md's prose cites {len(unsourced)} number(s) no table of its section holds: "
                f"{'; '.join(unsourced)}; fix: cite a generated table's value, or mark a figure from the "
                "literature with <!-- literature --> ... <!-- /literature -->"
            )
        misread = results.verdict_problems()
        if misread:
            raise ConfigError(
                f"RESULTS.md's prose reads {len(misread)} conclusion(s) the numbers do not give:\n  "
                + "\n  ".join(misread)
            )
        print(
            "RESULTS.md agrees with the committed CSVs, its prose cites only their numbers, and draws no "
            "conclusion from overlapping intervals or an interval that includes 0"
        )
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
        "--compare",
        action="append",
        default=[],
        metavar="CONTRAST",
        help="a paired contrast of a design's arms' effects, e.g. 'ip:a - ip:b' or a 2x2's interaction "
        "'ip:a - ip:b - ip:c + ip:d' (repeatable); leak tests and research axes are compared by default",
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
        help="plan a sweep: the power of seeds x items x arms, simulated and analysed as `analyze` does",
    )
    p.add_argument("--pilot", help="a pilot sweep's analysis folder (or the sweep): its rate, seed sd, items")
    p.add_argument("--design", help="the pilot's design key, where its analysis has several")
    p.add_argument("--arms", type=int, help="IP arms (default: the pilot's, else --prompts)")
    p.add_argument("--prompts", type=int, default=11, help="IP-style prompts (points of the correlation)")
    p.add_argument("--seeds", type=_ints, default=[2, 3, 5], help="seeds per arm to compare, e.g. 2,3,5")
    p.add_argument("--items", type=_ints, help="eval items per arm to compare (default 60,120,240)")
    p.add_argument("--control-rate", type=float, help="the control's behaviour rate (default: pilot, 0.85)")
    p.add_argument("--effect", type=float, default=0.22, help="target effect b(control) - b(IP)")
    p.add_argument(
        "--seed-sd",
        type=float,
        help="sd of a training run's seed effect on the logit scale (default: the pilot's, else 1.0)",
    )
    p.add_argument("--item-sd", type=float, default=1.5, help="sd of the eval items on the logit scale")
    p.add_argument("--reps", type=int, default=200, help="simulated sweeps per row")
    p.add_argument("--r", type=float, default=0.57, help="target correlation (default: the paper's 0.57)")
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
