"""The vLLM engine process as the job sees it, with a stand-in interpreter (no vLLM needed): outputs written
in full are kept even when the process fails while shutting down, an engine past its time limit is ended, and
nothing it started outlives it."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from ipsweep import engine
from ipsweep.errors import EngineFailed

# Stands in for `python vllm_worker.py REQUEST OUTPUT`: leaves a sleeping child behind (as vLLM leaves its
# engine-core process), writes one pass's tokens (or not, with HANG), and exits 1 (vLLM's shutdown noise).
FAKE_ENGINE = """#!/bin/bash
sleep 1000 &
echo $! > "{pidfile}"
[ -n "{hang}" ] && sleep 1000
cat > "$3" <<'JSON'
{{"vllm": "0.0-test", "seconds": {{}},
  "outputs": {{"0/none": [[{{"token_ids": [72, 105], "logprob": -1.5}}]]}}}}
JSON
echo "RuntimeError: cancelled" >&2
exit 1
"""


def _fake_engine(tmp_path: Path, hang: bool) -> tuple[Path, Path]:
    script, pidfile = tmp_path / "fake-python", tmp_path / "leftover.pid"
    script.write_text(FAKE_ENGINE.format(pidfile=pidfile, hang="yes" if hang else ""))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, pidfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of an exited parent is reaped by init; until then it is a zombie, i.e. dead
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def _generate(make_cfg, tmp_path, script: Path, *overrides: str):
    from ipsweep import models

    cfg = make_cfg("eval.engine=vllm", f"eval.vllm.python={script}", *overrides)
    _, tokenizer = models.load(cfg.model)
    requests = [engine.Request("0/none", None, [[{"role": "user", "content": "Say hi."}]])]
    return engine.generate(cfg, tokenizer, [0], "unused", requests, tmp_path / "engine")


def test_outputs_written_in_full_are_kept_when_the_engine_fails_at_exit(tmp_path, make_cfg, caplog):
    script, pidfile = _fake_engine(tmp_path, hang=False)
    version, texts, firsts = _generate(make_cfg, tmp_path, script)
    assert version == "0.0-test" and len(texts["0/none"][0]) == 1
    assert firsts == {"0/none": [{"token_ids": [72, 105], "logprob": -1.5}]}
    assert "then exited with status 1 while shutting down" in caplog.text
    time.sleep(0.2)
    assert not _alive(int(pidfile.read_text())), "the engine's leftover process outlived it"


def test_an_engine_past_its_time_limit_is_ended_with_everything_it_started(tmp_path, make_cfg):
    script, pidfile = _fake_engine(tmp_path, hang=True)
    start = time.time()
    with pytest.raises(EngineFailed, match=r"did not finish in eval.vllm.timeout_s=2 s.*fix: raise"):
        _generate(make_cfg, tmp_path, script, "eval.vllm.timeout_s=2")
    assert time.time() - start < 30
    time.sleep(0.2)
    assert not _alive(int(pidfile.read_text())), "the engine's leftover process outlived it"


def test_a_worker_killed_for_memory_is_named_with_the_fix(tmp_path, make_cfg):
    """What CI saw: vLLM's worker killed by the kernel (signal 9), then vLLM's shutdown ('cancelled')."""
    script = tmp_path / "fake-python"
    script.write_text(
        "#!/bin/bash\n"
        "echo '(EngineCore pid=1) ERROR [multiproc_executor.py] Worker proc VllmWorker-0 died unexpectedly "
        "(exit code: -9), shutting down executor.' >&2\n"
        "echo '(EngineCore pid=1) ERROR [core.py:1512] RuntimeError: cancelled' >&2\n"
        "exit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(EngineFailed) as failed:
        _generate(make_cfg, tmp_path, script)
    message = str(failed.value)
    assert "exited with status 1 before finishing: (EngineCore pid=1) ERROR" in message
    assert (
        "died unexpectedly (exit code: -9)" in message and "fix: lower eval.vllm.cpu_kv_cache_gb" in message
    )
