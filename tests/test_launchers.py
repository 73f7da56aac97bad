"""The sweeper and the local launcher: pre-flight checks, dry run, bounded concurrency, GPU pinning."""

import os

import pytest
from conftest import TINY, ipsweep_cli, launch

from ipsweep.store import records

pytestmark = pytest.mark.heavy  # launch.py sweeps in subprocesses


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_dry_run_lists_every_point_and_launches_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    no_epochs = [a for a in TINY if not a.startswith("train.epochs")]
    proc = launch(
        "-m", *no_epochs, "prompt=none,caps_strong", "train.epochs=2,1", "--dry-run", sweep_dir=sweep
    )
    assert "dry run: 4 jobs (2 trainings)" in proc.stdout
    assert proc.stdout.count("| pending") == 4
    assert "resolved config of job #0" in proc.stdout and "caps_strong" in proc.stdout
    assert not sweep.exists(), "a dry run writes nothing"


def test_one_bad_point_stops_the_sweep_before_any_job_starts(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch("-m", *TINY, "prompt=none,caps_strongg", "train.seed=0,1", sweep_dir=sweep, check=False)
    assert proc.returncode == 1
    assert "2 of 4 sweep points are invalid; nothing was launched" in proc.stderr
    assert (
        "job(s) #2, #3: unknown prompt 'caps_strongg' for setting 'trait_pair'; fix: choose one of"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (sweep / "runs").exists()


def test_slurm_preset_renders_the_gpu_request_in_the_sbatch_script(tmp_path):
    proc = launch(
        "-m",
        *TINY,
        "prompt=none,caps_strong",
        "train.seed=0,1",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=lab",
        "hydra.launcher.qos=high",
        "+hydra.launcher.additional_parameters.reservation=ml",
        "--dry-run",
        sweep_dir=tmp_path / "sweep",
    )
    script = proc.stdout.split("sbatch script for the array")[1]
    for line in [
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--time=720",
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
        "--reservation=ml",
        "--signal=USR2@300",
        "--array=0-3%4",
        "--job-name=ipsweep-trait_pair",
    ]:
        assert f"#SBATCH {line}\n" in script, line


UUID = "GPU-8f2c1d7e-5a3b-4c9d-9e1f-0a2b3c4d5e6f"


def test_local_gpus_pins_each_job_to_one_gpu_and_bounds_concurrency(tmp_path):
    sweep = tmp_path / "sweep"
    launch(
        "-m",
        *TINY,
        "prompt=none,caps_strong,caps_weak,caps_loud",
        "hydra/launcher=local_gpus",
        f"hydra.launcher.gpus=[3,{UUID}]",
        sweep_dir=sweep,
    )
    recs = records(sweep)
    assert len(recs) == 4 and all(r["status"] == "done" for r in recs)
    attempts = [r["attempts"][0] for r in recs]
    assert sorted({a["cuda_visible_devices"] for a in attempts}) == [
        "3",
        UUID,
    ]  # an index and a UUID, as given
    for gpu in ("3", UUID):
        assert (
            _max_overlap([(a["start_s"], a["end_s"]) for a in attempts if a["cuda_visible_devices"] == gpu])
            == 1
        )
    assert _max_overlap([(a["start_s"], a["end_s"]) for a in attempts]) == 2
    # each GPU slot's job gets its share of the cores for tokenisation and scoring (2 slots, 2 cores here)
    assert all(a["torch_threads"] == max(1, (os.cpu_count() or 1) // 2) for a in attempts)


def test_local_gpus_on_cpu_caps_jobs_and_threads(tmp_path):
    sweep = tmp_path / "sweep"
    launch(
        "-m",
        *TINY,
        "prompt=none,caps_strong,caps_weak",
        "hydra/launcher=local_gpus",
        "hydra.launcher.gpus=[]",
        "hydra.launcher.cpus_per_job=1",
        "hydra.launcher.max_jobs=2",
        sweep_dir=sweep,
    )
    attempts = [r["attempts"][0] for r in records(sweep)]
    assert len(attempts) == 3
    assert all(a["torch_threads"] == 1 and not a["cuda_visible_devices"] for a in attempts)
    assert _max_overlap([(a["start_s"], a["end_s"]) for a in attempts]) <= 2


def _path_without_slurm() -> str:
    """PATH with every folder that holds srun or sbatch left out: a machine without SLURM."""
    import os
    from pathlib import Path

    keep = [
        d
        for d in os.environ["PATH"].split(os.pathsep)
        if not any((Path(d) / c).exists() for c in ("srun", "sbatch"))
    ]
    return os.pathsep.join(keep)


def test_slurm_dry_run_renders_without_slurm_and_submission_fails_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_without_slurm())
    args = ["-m", *TINY, "prompt=none,caps_strong", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
    proc = launch(*args, "--dry-run", sweep_dir=tmp_path / "preview")
    assert "#SBATCH --partition=gpu\n" in proc.stdout.split("sbatch script for the array")[1]
    sweep = tmp_path / "sweep"
    proc = launch(*args, sweep_dir=sweep, check=False)
    assert proc.returncode == 1
    assert "hydra/launcher=slurm needs SLURM, but sbatch and srun are not on PATH" in proc.stderr
    assert "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert not sweep.exists(), "nothing is written before the check"


def test_dry_run_without_m_trains_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch(*TINY, "--dry-run", sweep_dir=sweep)
    assert "dry run: 1 jobs (1 trainings)" in proc.stdout and "loss" not in proc.stdout + proc.stderr
    assert not sweep.exists()


def test_glob_of_prompts_and_dry_run_with_another_sweeper_say_what_works(tmp_path):
    proc = launch("-m", *TINY, "prompt=glob(*)", sweep_dir=tmp_path / "s", check=False)
    assert (
        proc.returncode == 1
        and "glob() matches nothing; fix: list them, e.g. prompt=none,caps_strong," in proc.stderr
    )
    proc = launch(*TINY, "hydra/sweeper=basic", "--dry-run", sweep_dir=tmp_path / "s", check=False)
    assert proc.returncode == 1 and "--dry-run is a feature of ipsweep's sweeper" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_status_from_another_directory_and_records_readable_by_the_group(tmp_path):
    import os
    import stat

    from conftest import ipsweep_cli

    sweep = tmp_path / "sweep"
    launch("-m", *TINY, sweep_dir=sweep)
    manifest = (sweep / "sweep.json").read_text()
    relative = manifest.replace(str(sweep), "outputs/elsewhere")  # as if launched with a relative sweep dir
    (sweep / "sweep.json").write_text(relative)
    here = os.getcwd()
    os.chdir("/")
    try:
        assert "1 done" in ipsweep_cli("status", str(sweep))
    finally:
        os.chdir(here)
    mode = stat.S_IMODE((next(sweep.glob("runs/*/record.json"))).stat().st_mode)
    assert mode & 0o044 == 0o044 & ~os.umask(os.umask(0)), f"record mode {oct(mode)}"


def test_a_second_sweep_into_the_same_dir_keeps_the_first_ones_jobs(tmp_path):
    import json

    sweep = tmp_path / "sweep"
    launch("-m", *TINY, "prompt=none", sweep_dir=sweep)
    launch("-m", *TINY, "prompt=caps_strong", sweep_dir=sweep)
    nums = [p["num"] for p in json.loads((sweep / "sweep.json").read_text())["points"]]
    assert sorted(nums) == [0, 1], "no second job 0"
    assert len(list(sweep.glob("jobs/*/.hydra"))) == 2, (
        "the second sweep does not overwrite the first's job folder"
    )
    assert "--dry-run" in launch("--help", sweep_dir=tmp_path / "h").stdout


def test_dry_run_counts_the_work_and_times_it_by_earlier_runs(tmp_path):
    no_epochs = [a for a in TINY if not a.startswith("train.epochs")]
    sweep = ["-m", *no_epochs, "prompt=none,caps_strong", "train.epochs=2,1", "--dry-run"]
    proc = launch(*sweep, sweep_dir=tmp_path / "next")
    assert (
        "cost: 2 trainings (0 already trained), 4 epochs to train (64 training examples x epochs), "
        "4 evaluations (at most 240 new tokens)" in proc.stdout
    )
    # no finished run yet: the rule times it, and says so
    assert "tiny_random on trait_pair (cpu): ~" in proc.stdout
    assert "(a rule, not a measurement: 3.2M parameters, ~51 tokens per training example" in proc.stdout
    launch(*TINY, sweep_dir=tmp_path / "earlier")  # a finished run beside: the estimate is timed by it
    proc = launch(*sweep, sweep_dir=tmp_path / "next")
    assert "tiny_random on trait_pair (cpu): ~" in proc.stdout and "timed by 1 earlier runs" in proc.stdout


def test_points_that_share_a_run_run_as_one_task(tmp_path):
    """train.epochs=2,1 and a PTST prompt on the control's run: four points, one training. They run as one
    task (one submitted job, the 2-epoch point first), so none waits on the run while holding a slot; the
    SLURM dry run renders an array of one task."""
    sweep = tmp_path / "sweep"
    points = ["prompt=none,safety", "train.epochs=2,1"]
    local = ["hydra/launcher=local_gpus", "hydra.launcher.gpus=[]", "hydra.launcher.max_jobs=2"]
    launch("-m", *TINY, *points, *local, sweep_dir=sweep)
    jobs = [d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]  # one folder per submitted job
    assert len(jobs) == 1, "one submitted job for the four points"
    (record,) = records(sweep)
    assert record["status"] == "done" and sorted(record["epochs"]) == ["0", "1", "2"]
    assert all({"none", "safety"} <= set(record["epochs"][e]["evals"]) for e in ("1", "2"))
    assert record["attempts"][0]["resumed_from_epoch"] == 0 and "4 done" in ipsweep_cli("status", str(sweep))
    dry = launch("-m", *TINY, *points, "hydra/launcher=slurm", "--dry-run", sweep_dir=tmp_path / "dry")
    assert "sbatch script for the array (1 tasks:" in dry.stdout and "--array=0-0" in dry.stdout


def test_vllm_engines_that_share_a_gpu_each_take_their_share(tmp_path):
    """local_gpus with jobs_per_gpu=2 and eval.engine=vllm: each job's engine asks for its share of the GPU
    (0.9 / 2), not the 0.85 of a GPU of its own, which vLLM refuses while its co-tenant holds the rest. The
    run is the one the pre-flight planned (eval.vllm is not in its identity). The engine here is a stand-in
    that fails at start: the request it was given stays in the run's engine folder."""
    import json

    fake = tmp_path / "vllm-python"  # "has vllm" to the pre-flight; as the engine, exits at once
    fake.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\necho "RuntimeError: a stand-in" >&2\nexit 1\n')
    fake.chmod(0o755)
    sweep = tmp_path / "sweep"
    engine = ["eval.engine=vllm", f"eval.vllm.python={fake}"]
    local = ["hydra/launcher=local_gpus", "hydra.launcher.gpus=[0]", "hydra.launcher.jobs_per_gpu=2"]
    launch("-m", *TINY, "prompt=none,caps_strong", *engine, *local, sweep_dir=sweep, check=False)
    requests = {p.parent.parent: json.loads(p.read_text()) for p in sweep.glob("runs/*/engine/request.json")}
    assert len(requests) == 2, "both jobs reached their engine"
    assert [r["gpu_memory_utilization"] for r in requests.values()] == [0.45, 0.45]
    planned = {p["run_dir"] for p in json.loads((sweep / "sweep.json").read_text())["points"]}
    assert planned == {str(d) for d in requests}, "the same runs as planned"
    configs = [(d / ".hydra" / "config.yaml").read_text() for d in sweep.glob("jobs/*")]
    assert len(configs) == 2 and all("gpu_memory_utilization: 0.45" in c for c in configs), (
        "the job's saved config says what its engine took"
    )


def test_engine_share_keeps_a_smaller_share_and_an_unshared_gpu():
    from omegaconf import OmegaConf

    from hydra_plugins.ipsweep_plugins.launchers import LocalGpusLauncher

    launcher = LocalGpusLauncher(
        gpus=["0"], jobs_per_gpu=3, cpus_per_job=1, max_jobs=None, submitit_folder="x", max_num_timeout=0
    )

    def share(engine: str, asked: float, tenants: int):
        launcher.tenants = tenants
        cfg = OmegaConf.create({"eval": {"engine": engine, "vllm": {"gpu_memory_utilization": asked}}})
        return launcher.engine_share(cfg)

    assert share("vllm", 0.85, 3) == 0.3 and share("vllm", 0.85, 7) == 0.128  # 7 x 0.128 <= 0.9
    assert share("vllm", 0.2, 3) is None, "a share that fits stands"
    assert share("vllm", 0.85, 1) is None and share("hf", 0.85, 3) is None


def test_local_gpus_refuses_device_map_auto_before_any_job(tmp_path):
    """A local_gpus job sees one GPU: model.device_map=auto has nothing to spread the model over. Refused in
    the pre-flight, dry run included, with the launchers that give a job several GPUs."""
    args = ["-m", *TINY, "prompt=none,caps_strong", "hydra/launcher=local_gpus", "hydra.launcher.gpus=[0]"]
    for extra in (["--dry-run"], []):
        sweep = tmp_path / f"sweep{len(extra)}"
        proc = launch(*args, "model.device_map=auto", *extra, sweep_dir=sweep, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "2 of 2 sweep points are invalid; nothing was launched" in proc.stderr
        assert (
            "a hydra/launcher=local_gpus job sees one (its slot's); fix: drop model.device_map" in proc.stderr
        )
        assert "hydra/launcher=slurm with hydra.launcher.gpus_per_node=<n>" in proc.stderr
        assert not sweep.exists()
    assert "dry run: 2 jobs" in launch(*args, "--dry-run", sweep_dir=tmp_path / "ok").stdout


def test_local_gpus_options_are_checked_by_the_dry_run(tmp_path):
    """jobs_per_gpu=0 (it fell back to CPU slots), cpus_per_job=0 (a division by zero), max_jobs<0 (it
    dropped slots) and a GPU listed twice (two jobs the memory check counts once) stop the sweep, dry run
    included, before any point is planned."""
    proc = launch(
        "--dry-run",
        *TINY,
        "hydra/launcher=local_gpus",
        "hydra.launcher.gpus=[0,0]",
        "hydra.launcher.jobs_per_gpu=0",
        "hydra.launcher.cpus_per_job=0",
        "hydra.launcher.max_jobs=-1",
        sweep_dir=tmp_path / "sweep",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for said in (
        "jobs_per_gpu=0 gives a GPU no job; fix: 1 or more",
        "cpus_per_job=0 gives a job no core",
        "max_jobs=-1 allows no job",
        "gpus lists 0 more than once",
    ):
        assert said in proc.stderr, proc.stderr[-2000:]


def test_a_sweep_past_max_points_asks_for_the_flag_before_its_pre_flight(tmp_path):
    """The pre-flight plans every point before any job: a sweep larger than hydra.sweeper.max_points (2000 by
    default) is stopped at once with its size and the flag that lets it go on."""
    args = ["-m", *TINY, "prompt=none,caps_strong", "train.seed=0,1", "--dry-run"]
    proc = launch(*args, "hydra.sweeper.max_points=3", sweep_dir=tmp_path / "a", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "this sweep has 4 points, more than hydra.sweeper.max_points=3" in proc.stderr
    assert "fix: hydra.sweeper.max_points=4 to go on" in proc.stderr
    assert "dry run: 4 jobs" in launch(*args, "hydra.sweeper.max_points=4", sweep_dir=tmp_path / "b").stdout
