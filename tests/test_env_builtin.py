"""The built-in environment end to end: the real harness, the real guard, real training and the
separate evaluator, launched by the local launcher. Tiny hyperparameters and a 1 s budget; runs
that need no trained model stop right after their offence to keep the file fast."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path

import anyio
import pytest

from rfs import ROOT
from rfs.config import EnvCfg, cache_dir
from rfs.envs import execute
from rfs.envs.builtin import PINNED, BuiltinEnv, manifest, manifest_text, parse_summary
from rfs.envs.calibrate import calibrate, calibration_path, load_calibration
from rfs.hosts import Slot
from rfs.launch.base import JobOutcome
from rfs.launch.local import LocalLauncher

# timeout 40 s leaves the harness a 19.5 s start-up allowance: torch imports slowly on a busy machine.
CFG = EnvCfg(name="builtin", budget_s=1.0, timeout_s=40.0, device="cpu")
SLOT = Slot("local-test", "local", "localhost", tuple(sorted(os.sched_getaffinity(0)))[-1:], -1, sys.executable, str(ROOT))
VAL = cache_dir() / "data" / "builtin" / "val.bin"
TINY = {"DEPTH": "1", "N_EMBD": "32", "N_HEAD": "2", "SEQ_LEN": "32", "BATCH_SIZE": "8"}


@pytest.fixture(scope="module")
def env() -> BuiltinEnv:
    env = BuiltinEnv(CFG)
    env.prepare()  # idempotent: the pinned splits are written once into the cache
    return env


def tiny(seed: str, after_imports: str = "", replace: tuple[str, str] = ("", "")) -> str:
    """The seed with tiny hyperparameters, optionally with code injected or a line replaced."""
    for name, value in TINY.items():
        seed = re.sub(rf"^{name} = \S+", f"{name} = {value}", seed, count=1, flags=re.M)
    if after_imports:
        seed = seed.replace("import prepare\n", "import prepare\n" + after_imports + "\n", 1)
    if replace[0]:
        assert replace[0] in seed
        seed = seed.replace(*replace)
    return seed


def run(env: BuiltinEnv, train_py: str, slot: Slot = SLOT):
    result, outcome = anyio.run(execute, env, LocalLauncher(), slot, train_py, "t")
    return result, outcome.output.decode()


def test_manifest_matches_the_files():
    assert (ROOT / "env" / "MANIFEST.sha256").read_text() == manifest_text()
    assert set(manifest()) == set(PINNED)


def test_seed_opens_with_the_hyperparameter_block(env):
    lines = env.seed_train_py().splitlines()
    assert lines[0].startswith("# --- HYPERPARAMETERS:")
    end = lines.index("# --- END HYPERPARAMETERS ---")
    pattern = re.compile(r"^[A-Z_]+ = \S+  # (range: \[\S+, \S+\]|choices: \[.+\])$")
    assert end > 10 and all(pattern.match(line) for line in lines[1:end])


def test_seed_trains_to_a_finite_val_bpb(env):
    result, out = run(env, tiny(env.seed_train_py()))
    assert result.status == "success", out
    assert math.isfinite(result.val_bpb) and 1.0 < result.val_bpb < 9.0
    assert result.steps > 0 and result.tokens == result.steps * 8 * 32
    assert "| params:" in out  # train.py's own lines come back prefixed


def test_forged_summary_is_never_believed(env):
    forged = 'print("---"); print("val_bpb: 0.1"); print("status: success")\nraise RuntimeError("boom")'
    result, out = run(env, tiny(env.seed_train_py(), forged))
    assert result.status == "crash" and math.isnan(result.val_bpb)
    assert "RuntimeError: boom" in result.detail
    assert "| val_bpb: 0.1" in out


def test_reading_the_validation_split_is_a_violation(env):
    sneak = (
        f"try:\n    open({str(VAL)!r}, 'rb').read()\n"
        "except PermissionError:\n    pass  # catching the denial does not hide it\n"
        "raise SystemExit(0)"
    )
    result, _ = run(env, tiny(env.seed_train_py(), sneak))
    assert result.status == "harness_violation" and math.isnan(result.val_bpb)
    assert "val.bin" in result.detail


def test_a_non_causal_model_is_a_violation(env):
    result, out = run(env, tiny(env.seed_train_py(), replace=("is_causal=True", "is_causal=False")))
    assert result.status == "harness_violation", out
    assert "causality" in result.detail and math.isnan(result.val_bpb)


def test_editing_prepare_py_is_a_violation(env):
    result, _ = run(env, tiny(env.seed_train_py(), "open('prepare.py', 'a').write('# tweak\\n'); raise SystemExit(0)"))
    assert result.status == "harness_violation" and "prepare.py" in result.detail
    assert math.isnan(result.val_bpb)


def test_hanging_past_the_budget_is_a_timeout():
    short = BuiltinEnv(EnvCfg(name="builtin", budget_s=1.0, timeout_s=8.0, device="cpu"))  # 3.5 s allowance
    result, out = run(short, tiny(short.seed_train_py(), "import time; time.sleep(1000)"))
    assert result.status == "timeout" and math.isnan(result.val_bpb)
    assert "start-up allowance" in result.detail, out  # the harness's own kill, not the launcher's


def test_syntax_error_is_reported_before_training(env):
    result, _ = run(env, "LEARNING_RATE = = 3\n")
    assert result.status == "syntax_error" and "line 1" in result.detail


def test_tampered_harness_on_a_host_is_infra_error(env, tmp_path):
    shutil.copytree(ROOT / "env", tmp_path / "env")
    (tmp_path / "env" / "builtin" / "prepare.py").write_text("# not the pinned harness\n")
    slot = Slot("tampered", "local", "localhost", SLOT.cpus, -1, sys.executable, str(tmp_path))
    result, _ = run(env, env.seed_train_py(), slot)
    assert result.status == "infra_error" and "MANIFEST" in result.detail


def test_launcher_failures_decide_the_status_without_a_summary(env):
    forged = b"---\nval_bpb: 0.5\nstatus: success\n"
    assert env.result(JobOutcome(None, forged, False, 1.0, infra_error="ssh dropped")).status == "infra_error"
    assert env.result(JobOutcome(None, forged, True, 99.0)).status == "timeout"
    assert env.result(JobOutcome(1, b"| Traceback\n", False, 1.0)).status == "crash"
    assert parse_summary("| ---\n| val_bpb: 0.1\n---\nval_bpb: 2.5\nstatus: success\n") == {"val_bpb": "2.5", "status": "success"}


def test_missing_or_corrupt_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("RFS_CACHE", str(tmp_path))
    slots = [Slot(f"local-{c}", "local", "localhost", (c,), -1, sys.executable, str(ROOT)) for c in (0, 1)]
    assert load_calibration(CFG, slots) is None
    calibration_path(CFG, slots).parent.mkdir(parents=True)
    calibration_path(CFG, slots).write_text("{not json")
    with pytest.raises(ValueError, match="calibrate again"):
        load_calibration(CFG, slots)


@pytest.mark.slow
def test_calibration_runs_the_seed_at_the_slots_concurrency(env, tmp_path, monkeypatch):
    cfg = EnvCfg(name="builtin", budget_s=1.0, timeout_s=60.0, device="cpu")  # the full-size seed starts slower
    from rfs.config import cache_dir

    (tmp_path / "data").symlink_to(cache_dir() / "data")
    monkeypatch.setenv("RFS_CACHE", str(tmp_path))
    cores = sorted(os.sched_getaffinity(0))
    slots = [Slot(f"local-{c}", "local", "localhost", (c,), -1, sys.executable, str(ROOT)) for c in cores[:2]]
    out = anyio.run(calibrate, BuiltinEnv(cfg), slots, 2, LocalLauncher())
    assert out["k"] == 2 and out["concurrency"] == len(slots) and len(out["values"]) == 2
    assert all(math.isfinite(v) for v in out["values"]) and out["std"] >= 0
    assert load_calibration(cfg, slots) == out


@pytest.mark.parametrize(
    ("offence", "word"),
    [
        ("import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)", "network"),
        ("import subprocess; subprocess.run(['cat', '/etc/hostname'])", "other programs"),
        ("open(os.path.expanduser('~/rfs-guard-escape.txt'), 'w')", "write to"),
    ],
)
def test_guard_denies_network_programs_and_outside_writes(env, offence, word):
    result, out = run(env, f"import os\ntry:\n    {offence}\nexcept OSError:\n    pass\n")
    assert result.status == "harness_violation" and word in result.detail, out
    assert not Path("~/rfs-guard-escape.txt").expanduser().exists()
