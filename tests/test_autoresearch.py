"""The autoresearch adapter: the summary parser on recorded output, and the host runner's
restore + sha256 guard run for real against a stand-in checkout (the real one needs CUDA)."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

from rfs.config import EnvCfg
from rfs.envs.autoresearch import AutoresearchEnv, parse_autoresearch, upstream
from rfs.hosts import Slot
from rfs.launch.base import JobOutcome

# Recorded from autoresearch's train.py: a \r-rewritten progress line, then the summary.
RECORDED = (
    "Vocab size: 8,192\nTime budget: 300s\n"
    "\rstep 00951 (99.9%) | loss: 2.871 | lrm: 0.01 | dt: 315ms | tok/sec: 1,664,201 | mfu: 39.8% | epoch: 1 | remaining: 0s    "
    "\rstep 00953 (100.0%) | loss: 2.870 | lrm: 0.00 | dt: 315ms | tok/sec: 1,664,480 | mfu: 39.8% | epoch: 1 | remaining: 0s    \n"
    "---\n"
    "val_bpb:          0.997900\n"
    "training_seconds: 300.1\n"
    "total_seconds:    325.9\n"
    "peak_vram_mb:     45060.2\n"
    "mfu_percent:      39.80\n"
    "total_tokens_M:   499.6\n"
    "num_steps:        953\n"
    "num_params_M:     50.3\n"
    "depth:            8\n"
)
CFG = EnvCfg(name="autoresearch", budget_s=2.0, timeout_s=20.0, device="cuda")


def test_parses_the_recorded_summary():
    s = parse_autoresearch(RECORDED)
    assert s["val_bpb"] == "0.997900" and s["num_steps"] == "953" and s["peak_vram_mb"] == "45060.2"
    assert set(s) == {"val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                      "total_tokens_M", "num_steps", "num_params_M", "depth"}


def test_upstream_is_pinned_to_a_commit():
    up = upstream()
    assert up["url"] == "https://github.com/karpathy/autoresearch"
    assert len(up["commit"]) == 40 and int(up["commit"], 16) >= 0
    assert len(up["prepare_sha256"]) == 64 and len(up["train_sha256"]) == 64


def _checkout(tmp: Path) -> tuple[Path, Path]:
    """A stand-in vendored checkout: a pristine prepare.py, pins for it, and the interpreter link."""
    checkout = tmp / "checkout"
    (checkout / ".rfs-pristine").mkdir(parents=True)
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").symlink_to(sys.executable)
    prepare = b"def evaluate_bpb():\n    return 0.9979\n"
    (checkout / ".rfs-pristine" / "prepare.py").write_bytes(prepare)
    pins = tmp / "UPSTREAM"
    digest = hashlib.sha256(prepare).hexdigest()
    pins.write_text(f"url = x\ncommit = {'0' * 40}\nprepare_sha256 = {digest}\ntrain_sha256 = {'0' * 64}\n")
    return checkout, pins


def _run(tmp: Path, train_py: str, pins: Path | None = None) -> JobOutcome:
    checkout, own_pins = _checkout(tmp)
    workdir = tmp / "work"
    workdir.mkdir()
    (workdir / "train.py").write_text(train_py)
    argv = [sys.executable, "-m", "rfs.envs.autoresearch", "run", "--workdir", str(workdir),
            "--checkout", str(checkout), "--kill-after", "10", "--upstream", str(pins or own_pins)]
    proc = subprocess.run(argv, capture_output=True, env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
    return JobOutcome(proc.returncode, proc.stdout + proc.stderr, False, 1.0)


def test_runner_success_records_both_hashes(tmp_path):
    train = f"import prepare\nprint({RECORDED!r})\n"
    result = AutoresearchEnv(CFG).result(_run(tmp_path, train))
    assert result.status == "success" and result.val_bpb == 0.9979 and result.steps == 953
    assert result.tokens == 499_600_000 and result.peak_memory_mb == 45060.2
    assert result.summary["prepare_sha256_before"] == result.summary["prepare_sha256_after"]
    assert "| val_bpb:          0.997900" in result.stdout_tail


def test_runner_editing_prepare_is_a_violation(tmp_path):
    train = f"open('prepare.py', 'a').write('# better\\n')\nprint({RECORDED!r})\n"
    result = AutoresearchEnv(CFG).result(_run(tmp_path, train))
    assert result.status == "harness_violation" and math.isnan(result.val_bpb)
    assert result.summary["prepare_sha256_before"] != result.summary["prepare_sha256_after"]


def test_runner_crash_and_syntax_error(tmp_path):
    crash = AutoresearchEnv(CFG).result(_run(tmp_path / "a", "raise SystemExit('CUDA out of memory')\n"))
    assert crash.status == "crash" and "CUDA out of memory" in crash.detail and math.isnan(crash.val_bpb)
    syntax = AutoresearchEnv(CFG).result(_run(tmp_path / "b", "def f(:\n"))
    assert syntax.status == "syntax_error"


def test_runner_unpinned_prepare_is_infra_error(tmp_path):
    pins = tmp_path / "other-pins"
    pins.write_text(f"url = x\ncommit = {'0' * 40}\nprepare_sha256 = {'f' * 64}\ntrain_sha256 = {'0' * 64}\n")
    result = AutoresearchEnv(CFG).result(_run(tmp_path, "print('hi')\n", pins))
    assert result.status == "infra_error" and "pinned" in result.detail


def test_job_runs_the_host_runner_on_the_slot():
    slot = Slot("gpu-3", "ssh", "node1", (), 3, "/opt/py/bin/python", "/srv/rfs")
    job = AutoresearchEnv(CFG).job("print(1)\n", slot, "r1")
    assert job.argv[:3] == ("/opt/py/bin/python", "-m", "rfs.envs.autoresearch")
    assert "/srv/rfs/env/autoresearch/checkout" in job.argv and job.env["CUDA_VISIBLE_DEVICES"] == "3"
    assert job.files == {"train.py": b"print(1)\n"} and job.timeout_s == CFG.timeout_s
