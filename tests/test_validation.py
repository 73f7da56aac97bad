"""Bad input fails before any job starts, with one message that names the problem and the fix.

Each case runs a two-point sweep through launch.py, as a user would, and checks the message, the exit
code and that nothing was written under runs/.
"""

import shutil

import pytest
from conftest import TINY, launch

from ipsweep.settings.base import DATA_DIR


def _bad_data_dir(tmp_path, content: str | None):
    d = tmp_path / "data"
    shutil.copytree(DATA_DIR / "gcd_sycophancy", d / "gcd_sycophancy")
    train = d / "gcd_sycophancy" / "train.jsonl"
    if content is None:
        train.unlink()
    else:
        train.write_text(train.read_text().split("\n", 1)[0] + "\n" + content + "\n")
    return d, train


CASES = {
    # Hydra composition: the message lists the valid choices.
    "unknown setting": (["setting=nope"], ["Could not find 'setting/nope'", "trait_pair", "gcd_sycophancy"]),
    "unknown model": (["model=nope"], ["Could not find 'model/nope'", "smollm2_135m", "tiny_random"]),
    "unknown launcher": (
        ["hydra/launcher=nope"],
        ["Could not find 'hydra/launcher/nope'", "local_gpus", "slurm"],
    ),
    "wrong type": (
        ["train.epochs=two"],
        ["Value 'two' of type 'str' could not be converted to Integer", "train.epochs"],
    ),
    "unknown key": (
        ["train.epoch=2"],
        [
            "unknown key train.epoch (did you mean train.epochs?)",
            "fix: use one of train's keys: epochs, seed, lr,",
        ],
    ),
    "unknown key added with +": (
        ["+train.lrr=1"],
        ["unknown key train.lrr (did you mean train.lr?)", "A '+' does not add keys"],
    ),
    "unknown nested key added with +": (
        ["+train.lora.rr=4"],
        ["unknown key train.lora.rr", "train.lora's keys: r, alpha"],
    ),
    # ipsweep's pre-flight check of every point.
    "unknown prompt": (
        ["prompt=caps_strongg"],
        ["unknown prompt 'caps_strongg'", "fix: choose one of: none, caps_format"],
    ),
    "missing required value": (
        ["model=hf"],
        ["model=hf needs model.path; fix: add `model.path=/path/to/model`"],
    ),
    "hub id not cached while offline": (
        ["model=hf", "model.path=nobody-xyz/no-such-model"],
        [
            "model.path 'nobody-xyz/no-such-model' is a hub id that is not in the local Hugging Face cache",
            "fix: point model.path at a local folder",
        ],
    ),
    "value out of range": (
        ["train.lr=-1"],
        ["train.lr=-1.0 must be a positive finite number; fix: e.g. train.lr=5e-4"],
    ),
    "unknown choice": (
        ["train.sampling=sorted"],
        ["train.sampling=sorted is unknown; fix: one of group_by_length, random"],
    ),
    "contradiction: samples of greedy decoding": (
        ["eval.samples_per_prompt=4"],
        [
            "with greedy decoding (eval.temperature=0) repeats one completion",
            "fix: eval.samples_per_prompt=1, or sample with eval.temperature>0",
        ],
    ),
    "contradiction: safety test grid without a safety prompt": (
        ["~setting.prompts.safety", "eval.test_grid=true"],
        ["setting 'trait_pair' has none; fix: add one"],
    ),
    "a key the chosen model ignores": (
        ["model.path=/tmp"],
        [
            "model.path=/tmp is used only by model=hf; model=tiny_random",
            "fix: add model=hf (to load that path), or drop model.path",
        ],
    ),
    "eval size larger than the data": (
        ["eval.n_eval=100000"],
        [
            "eval.n_eval=100000 but setting 'trait_pair' has at most 60",
            "fix: eval.n_eval=60 or eval.n_eval=null (all)",
        ],
    ),
    "train size larger than the data": (
        ["train.n_train=100000"],
        ["train.n_train=100000 but setting 'trait_pair' has", "or train.n_train=null (all)"],
    ),
    "unknown evaluation engine": (
        ["eval.engine=tgi"],
        ["eval.engine=tgi is unknown; fix: one of hf, vllm"],
    ),
    # The training environment has no vllm (it lives in .venv-vllm): found before any job, not in one.
    "vllm engine in an environment without vllm": (
        ["eval.engine=vllm"],
        ["cannot import vllm; fix: `make vllm` and eval.vllm.python=.venv-vllm/bin/python"],
    ),
    "vllm interpreter that does not run": (
        ["eval.engine=vllm", "eval.vllm.python=/nonexistent/python"],
        ["eval.vllm.python=/nonexistent/python does not run; fix:"],
    ),
    "no KV cache for vLLM on CPU": (
        ["eval.engine=vllm", "eval.vllm.cpu_kv_cache_gb=0"],
        ["eval.vllm.cpu_kv_cache_gb=0.0 must be > 0 (GiB); fix: e.g. 2"],
    ),
    "unknown setting option": (
        ["+setting.options.per_typ=3"],
        ["setting 'trait_pair' has no option per_typ; fix: use one of"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_any_job_with_the_fix(tmp_path, case):
    overrides, messages = CASES[case]
    sweep = tmp_path / "sweep"
    proc = launch("-m", *TINY, *overrides, "train.seed=0,1", sweep_dir=sweep, check=False)
    assert proc.returncode == 1
    for m in messages:
        assert m in proc.stderr, f"{m!r} not in:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert not (sweep / "runs").exists()


def test_empty_prompt_library(tmp_path):
    # A new setting whose YAML has no prompts yet, found through --config-dir.
    (tmp_path / "conf" / "setting").mkdir(parents=True)
    (tmp_path / "conf" / "setting" / "new_setting.yaml").write_text(
        "defaults:\n  - setting_schema\n  - _self_\n_target_: ipsweep.settings.trait_pair.TraitPair\nname: "
        "new_setting\n"
    )
    proc = launch(
        "-m",
        "--config-dir",
        str(tmp_path / "conf"),
        *TINY,
        "setting=new_setting",
        "prompt=caps_strong",
        "train.seed=0,1",
        sweep_dir=tmp_path / "sweep",
        check=False,
    )
    assert proc.returncode == 1
    assert (
        "setting 'new_setting' has an empty prompt library; fix: add prompts under setting.prompts"
        in proc.stderr
    ), proc.stderr
    assert not (tmp_path / "sweep" / "runs").exists()


def test_model_path_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = launch(
        "-m",
        *TINY,
        "model=hf",
        f"model.path={tmp_path / 'empty'}",
        "train.seed=0,1",
        sweep_dir=tmp_path / "sweep",
        check=False,
    )
    assert (
        proc.returncode == 1
        and "holds no weights (*.safetensors or *.bin); fix: point it at a saved model folder" in proc.stderr
    )
    assert not (tmp_path / "sweep" / "runs").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "train.jsonl:2: not valid JSON"),
        ('{"messages": []}', "train.jsonl:2: missing field(s)"),
        (None, "data file not found:"),
    ],
)
def test_malformed_or_missing_data_file_names_the_file_and_line(tmp_path, content, message):
    data_dir, _ = _bad_data_dir(tmp_path, content)
    proc = launch(
        "-m",
        *TINY,
        "setting=gcd_sycophancy",
        f"+setting.options.data_dir={data_dir}",
        "train.seed=0,1",
        sweep_dir=tmp_path / "sweep",
        check=False,
    )
    assert proc.returncode == 1 and message in proc.stderr and "fix:" in proc.stderr, proc.stderr
    assert not (tmp_path / "sweep" / "runs").exists()


@pytest.mark.parametrize("command", ["status", "analyze"])
def test_a_folder_that_is_not_a_sweep_dir(tmp_path, command):
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ipsweep")), command, str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        f"'{tmp_path}' is not a sweep dir" in proc.stderr
        and "fix: pass the folder a sweep wrote" in proc.stderr
    )


def test_truncated_json_data_file_names_file_position_and_fix(tmp_path):
    import shutil

    from ipsweep.settings.base import DATA_DIR

    shutil.copytree(DATA_DIR / "code_reward_hack", tmp_path / "data" / "code_reward_hack")
    target = tmp_path / "data" / "code_reward_hack" / "sanitized-mbpp.json"
    target.write_text(target.read_text()[:5000])
    proc = launch(
        "-m",
        *TINY,
        "setting=code_reward_hack",
        f"+setting.options.data_dir={tmp_path / 'data'}",
        "train.seed=0,1",
        sweep_dir=tmp_path / "sweep",
        check=False,
    )
    assert proc.returncode == 1 and f"{target}: not valid JSON at line" in proc.stderr
    assert "fix: restore the file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lora.alpha=0", "train.lora.alpha=0 scales the adapter by alpha/r = 0 or less"),
        ("train.weight_decay=nan", "train.weight_decay=nan must be a finite number >= 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 must be a finite number >= 0"),
        ("train.weight_decay=inf", "train.weight_decay=inf must be a finite number >= 0"),
    ],
)
def test_optimiser_and_adapter_values_that_would_train_nothing_or_nan_are_refused(
    make_cfg, override, message
):
    """Values the schema accepts but a run cannot use: refused by the pre-flight with the fix."""
    from ipsweep.errors import ConfigError
    from ipsweep.validate import check_values

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(") + ".*fix"):
        check_values(make_cfg(override))
