"""eval.engine=vllm on the embedded model, for real: the same numbers as HF, the adapter gate, extension to
more epochs, and a failed engine start recorded as a failed run.

vLLM lives in its own environment (`make vllm` makes .venv-vllm; its pins conflict with the training
stack's), which `make test` installs. Each engine start costs ~1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, launch

from ipsweep import screen
from ipsweep.store import records

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm")]  # one engine at a time
VLLM_PYTHON = os.environ.get("IPSWEEP_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))


@pytest.fixture(scope="module")
def vllm_python() -> str:
    assert Path(VLLM_PYTHON).is_file(), (
        f"no vLLM environment at {VLLM_PYTHON}; fix: `make vllm` (make test does it), or set "
        "IPSWEEP_VLLM_PYTHON to an interpreter that has vllm"
    )
    return VLLM_PYTHON


RUN = [
    "model=smollm2_135m",
    "logger=none",
    "prompt=caps_strong",
    "elicit.logprob_items=8",  # the engine does not compute it; each run's 64 pairs cost ~12 s
    "train.n_train=16",
    "eval.n_eval=10",
    "eval.max_new_tokens=12",
]


def _outcomes(record: dict) -> dict:
    """Per epoch and test prompt: the per-item outcomes (what every statistic is computed from)."""
    return {(e, t): ev["items"] for e, ep in record["epochs"].items() for t, ev in ep["evals"].items()}


def test_vllm_matches_hf_and_extends_to_new_epochs(tmp_path, vllm_python):
    engine = ["eval.engine=vllm", f"eval.vllm.python={vllm_python}"]
    launch(*RUN, "train.epochs=1", sweep_dir=tmp_path / "hf")
    launch(*RUN, "train.epochs=1", *engine, sweep_dir=tmp_path / "vllm")
    (hf,), (vl,) = records(tmp_path / "hf"), records(tmp_path / "vllm")
    assert hf["signature"] != vl["signature"], "the engine enters a run's identity"
    assert vl["status"] == "done" and sorted(vl["epochs"]) == ["0", "1"]
    # fp32 on CPU: vLLM's greedy replies, decoded and scored as HF's, give the same outcome on every item
    assert _outcomes(vl) == _outcomes(hf)
    for e in ("0", "1"):
        replies = [
            [
                json.loads(line)["completion"]
                for line in (Path(r["run_dir"]) / "samples" / f"epoch{e}_none.jsonl").open()
            ]
            for r in (hf, vl)
        ]
        assert replies[0] == replies[1], f"epoch {e}: vLLM's replies differ from HF's"
    checks = vl["engine_checks"]
    assert checks["0"]["passed"] and checks["0"]["agreement"] == 1.0
    assert checks["1"]["passed"] and checks["1"]["agreement"] == 1.0 and checks["1"]["logprob_shift"] > 1e-3
    p = vl["epochs"]["1"]["evals"]["none"]["protocol"]
    assert p["engine"] == "vllm" and p["version"] == "0.32.0" and p["dtype"] == "fp32"
    # the adapter is named from the sweep's runs/ folder, so a moved or repeated sweep records the same
    assert Path(vl["run_dir"]).parent / p["adapter"] == Path(vl["epochs"]["1"]["checkpoint"])
    assert p["step"] == vl["epochs"]["1"]["steps"]
    assert p["stop_token_ids"] == vl["stop_token_ids"] and len(p["chat_template_sha256"]) == 16
    assert hf["epochs"]["1"]["evals"]["none"]["protocol"]["engine"] == "hf"
    # the sampled estimator's prompted replies join the engine's pass; its unprompted ones are epoch 0's
    request = json.loads((Path(vl["run_dir"]) / "engine" / "request.json").read_text())
    assert [j["key"] for j in request["jobs"]] == [
        "0/none",
        "1/none",
        "sampled/caps_strong",
        "gate/0",
        "gate/1",
    ]
    assert vl["elicitation"] == hf["elicitation"], "greedy fp32: the same estimates from either engine"

    # Two epochs: the engine evaluates epoch 2 only (and gates only its adapter); epoch 1 is kept as it was.
    launch(*RUN, "train.epochs=2", *engine, sweep_dir=tmp_path / "vllm")
    (vl2,) = records(tmp_path / "vllm")
    assert vl2["status"] == "done" and sorted(vl2["epochs"]) == ["0", "1", "2"]
    request = json.loads((Path(vl2["run_dir"]) / "engine" / "request.json").read_text())
    assert [j["key"] for j in request["jobs"]] == ["2/none", "gate/0", "gate/2"]
    assert vl2["epochs"]["1"]["evals"] == vl["epochs"]["1"]["evals"]
    assert vl2["engine_checks"]["2"]["passed"] and vl2["engine_checks"]["1"] == checks["1"]


def test_gate_refuses_an_adapter_that_changes_nothing_and_items_sample_apart(tmp_path, vllm_python, make_cfg):
    """An adapter saved untrained (LoRA B = 0) is what vLLM serves when an adapter is not applied: the gate
    sees no change from the base model and the error names the adapter. In the same engine pass (one start):
    sampled items with identical prompts draw samples of their own (one seed for all would make them equal),
    and a second pass over the same items draws the same ones (common random numbers across conditions)."""
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from ipsweep import engine, lm, models
    from ipsweep.errors import EngineCheckFailed

    cfg = make_cfg(*RUN, f"eval.vllm.python={vllm_python}", "eval.vllm.gate_prompts=4", tiny=False)
    model, tokenizer = models.load(cfg.model)
    adapter = tmp_path / "untrained"
    lora = LoraConfig(r=cfg.train.lora.r, target_modules=list(cfg.train.lora.target_modules))
    get_peft_model(model, lora).save_pretrained(adapter)
    chats = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "Name a colour.", "Say hi.", "Why?")]
    requests = [
        engine.Request(f"gate/{e}", a, chats, greedy=True, logprobs=True)
        for e, a in ((0, None), (1, str(adapter)))
    ]
    sampled = OmegaConf.merge(cfg.eval, {"temperature": 1.0, "samples_per_prompt": 2, "max_new_tokens": 12})
    same = [[{"role": "user", "content": "Name an animal and say one thing about it."}]] * 4
    requests += [engine.Request(k, None, same, eval_cfg=sampled) for k in ("items/a", "items/b")]
    folder = engine.model_folder(cfg, tmp_path / "model")
    stop = lm.stop_token_ids(model, tokenizer)
    _, texts, firsts = engine.generate(cfg, tokenizer, stop, folder, requests, tmp_path / "engine")
    checks = engine.gate(cfg, chats, texts, firsts, {0: None, 1: str(adapter)})
    assert checks[0]["passed"] and checks[0]["agreement"] == 1.0, "vLLM and HF agree on the base model"
    assert len({tuple(samples) for samples in texts["items/a"]}) > 1, "identical prompts, one draw for all"
    assert texts["items/a"] == texts["items/b"], "each item draws the same samples on every pass"
    # a shift at rounding level (3e-8 nats per reply measured), far below what the gate counts as applied
    assert not checks[1]["passed"] and checks[1]["changed_replies"] == 0
    assert checks[1]["logprob_shift"] < engine.MIN_LOGPROB_SHIFT
    error = engine.refuse(1, checks[1])
    assert (
        isinstance(error, EngineCheckFailed)
        and str(adapter) in str(error)
        and "changes nothing" in str(error)
    )


def test_a_failed_engine_start_is_a_failed_run_that_keeps_its_training(tmp_path, vllm_python):
    """vLLM's CPU attention rejects the tiny model's head_dim 16: the run is recorded failed with vLLM's own
    reason, and its trained epoch is kept for a rerun."""
    proc = launch(
        "model=tiny_random",
        "logger=none",
        "prompt=caps_strong",
        "train.n_train=16",
        "eval.n_eval=4",
        "eval.max_new_tokens=4",
        "eval.engine=vllm",
        f"eval.vllm.python={vllm_python}",
        sweep_dir=tmp_path / "sweep",
        check=False,
    )
    assert proc.returncode != 0
    (r,) = records(tmp_path / "sweep")
    assert r["status"] == "failed" and r["error"]["type"] == "EngineFailed"
    assert "head_dim=16" in r["error"]["message"] and "engine.log" in r["error"]["message"]
    assert r["epochs"]["1"]["evals"] == {} and Path(r["epochs"]["1"]["checkpoint"]).is_dir()


def test_screen_samples_with_vllm_as_with_hf(tmp_path, vllm_python, make_cfg):
    """`ipsweep screen` with eval.engine=vllm: one engine pass generates every prompt's sampled replies (after
    the gate on the base model), and the table equals HF's."""
    # four of the library's prompts (a strong and a weak request, the placebo and the neutral prompt): the
    # table's equality does not need all 15, and each costs an HF generation pass
    dropped = ("caps_shout", "caps_upper", "caps_shout_lower", "caps_upper_shout", "caps_loud", "caps_format")
    dropped += ("caps_please", "caps_ok", "irrelevant", "irrelevant_shout", "safety")
    common = (*RUN, "elicit.estimators=[sampled]", *(f"~setting.prompts.{p}" for p in dropped))
    hf = screen.screen(make_cfg(*common, tiny=False), surface=False)
    engine = ("eval.engine=vllm", f"eval.vllm.python={vllm_python}")
    vl = screen.screen(make_cfg(*common, *engine, tiny=False), surface=False, workdir=tmp_path / "screen")
    request = json.loads((tmp_path / "screen" / "engine" / "request.json").read_text())
    named = [p for p in vl.prompt if p != "none"]
    assert sorted(j["key"] for j in request["jobs"]) == sorted(
        ["gate/0", "sampled/none", *(f"sampled/{p}" for p in named)]
    )
    by_prompt = ["prompt", "sampled", "sampled_lo", "sampled_hi", "behaviour_with_prompt"]
    pd.testing.assert_frame_equal(
        vl[by_prompt].sort_values("prompt", ignore_index=True),
        hf[by_prompt].sort_values("prompt", ignore_index=True),
    )
