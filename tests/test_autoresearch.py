"""The autoresearch adapter: the summary parser on recorded output, and the host runner run for real
against a CPU stand-in checkout (tests/autoresearch_standin, upstream's file contract; the real one
needs CUDA): confinement, the runner's clock, the hand-over and the separate pristine evaluation."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pyarrow.parquet as pq
import pytest
import zstandard

from rfs import config, trace
from rfs.collect.slots import SlotPool
from rfs.config import EnvCfg, cache_dir
from rfs.envs.autoresearch import STATUSES, AutoresearchEnv, parse_autoresearch, upstream
from rfs.envs.builtin import BuiltinEnv
from rfs.evals import metrics, probes
from rfs.events import EventLog
from rfs.hosts import HostsFile, Slot
from rfs.launch.base import JobOutcome
from rfs.loop import evals
from rfs.loop.experiment import Experiment
from rfs.loop.plan import LoopSpec
from rfs.loop.serving import Servers
from rfs.loop.state import ExperimentState, Noise
from rfs.rundir import RunDir
from rfs.trace import PROBE

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


STANDIN = Path(__file__).parent / "autoresearch_standin"  # a CPU stand-in with upstream's file contract
BUDGET, TOLERANCE, STARTUP, EVAL = 2.0, 5.0, 30.0, 60.0


@pytest.fixture(scope="module")
def standin() -> Iterator[tuple[Path, Path, Path]]:
    """A vendored stand-in checkout (pristine files, interpreter link), its pins and a HOME with its
    data. Outside /tmp: the sandbox gives each run a private /tmp, and the checkout must stay visible."""
    BuiltinEnv(EnvCfg(name="builtin", device="cpu")).prepare()
    base = Path.home() / ".cache" / f"rfs-test-standin-{uuid.uuid4().hex[:8]}"
    checkout, home = base / "checkout", base / "home"
    (checkout / ".rfs-pristine").mkdir(parents=True)
    (checkout / ".venv").symlink_to(sys.prefix)  # this interpreter's environment, as the checkout's own
    for name in ("prepare.py", "train.py"):
        shutil.copyfile(STANDIN / name, checkout / ".rfs-pristine" / name)
    digest = {n: hashlib.sha256((STANDIN / n).read_bytes()).hexdigest() for n in ("prepare.py", "train.py")}
    pins = base / "UPSTREAM"
    pins.write_text(f"url = x\ncommit = {'0' * 40}\nprepare_sha256 = {digest['prepare.py']}\ntrain_sha256 = {digest['train.py']}\n")
    (checkout / ".rfs-env").write_text("HF_HUB_OFFLINE=1\n")  # as vendor.sh writes it: every run gets it
    subprocess.run([sys.executable, str(STANDIN / "prepare.py"), "--from", str(cache_dir() / "data" / "builtin")],
                   check=True, capture_output=True, env=dict(os.environ, HOME=str(home)))
    yield checkout, pins, home
    shutil.rmtree(base, ignore_errors=True)


def _run(standin, tmp: Path, train_py: str, pins: Path | None = None) -> JobOutcome:
    checkout, own_pins, home = standin
    workdir = tmp / "work"
    workdir.mkdir(parents=True)
    (workdir / "train.py").write_text(train_py)
    argv = [sys.executable, "-m", "rfs.envs.autoresearch", "run", "--workdir", str(workdir), "--checkout", str(checkout),
            "--budget", f"{BUDGET:g}", "--startup", f"{STARTUP:g}", "--tolerance", f"{TOLERANCE:g}",
            "--eval-timeout", f"{EVAL:g}", "--upstream", str(pins or own_pins)]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, env=dict(os.environ, PYTHONPATH=str(Path.cwd()), HOME=str(home)))
    return JobOutcome(proc.returncode, proc.stdout + proc.stderr, False, time.monotonic() - started)


def _seed(replace: tuple[str, str] = ("", ""), after_imports: str = "") -> str:
    seed = (STANDIN / "train.py").read_text()
    if replace[0]:
        assert replace[0] in seed
        seed = seed.replace(*replace)
    anchor = "from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, evaluate_bpb, make_dataloader\n"
    return seed.replace(anchor, anchor + after_imports + "\n", 1)


def _result(standin, tmp: Path, train_py: str, pins: Path | None = None):
    outcome = _run(standin, tmp, train_py, pins)
    result = AutoresearchEnv(CFG).result(outcome)
    assert result.summary.get("status") in STATUSES, outcome.output.decode()
    return result, outcome.output.decode()


def test_the_standin_seed_runs_inside_its_time_rules_and_is_scored_by_the_harness(standin, tmp_path):
    result, out = _result(standin, tmp_path, _seed())
    assert result.status == "success", out
    assert math.isfinite(result.val_bpb) and 1.0 < result.val_bpb < 9.0
    assert BUDGET <= result.training_seconds <= BUDGET + TOLERANCE  # the harness's clock, first batch to hand-over
    assert float(result.summary["startup_seconds"]) <= STARTUP and float(result.summary["eval_seconds"]) <= EVAL
    assert result.summary["isolation"].startswith("mount+pid") and result.steps > 0
    assert result.summary["prepare_sha256_before"] == result.summary["prepare_sha256_after"]
    assert "| val_bpb:" not in out  # the run ended at the hand-over: its own evaluation never ran


def test_training_past_the_budget_is_a_timeout(standin, tmp_path):
    result, out = _result(standin, tmp_path, _seed(after_imports="TIME_BUDGET = 60"))
    assert result.status == "timeout" and "harness clock" in result.detail and math.isnan(result.val_bpb), out


@pytest.mark.slow  # waits out the start-up allowance
def test_a_start_up_past_its_allowance_is_a_timeout(standin, tmp_path):
    result, out = _result(standin, tmp_path, _seed(after_imports=f"time.sleep({STARTUP + 30:g})"))
    assert result.status == "timeout" and "start-up" in result.detail, out


def test_a_monkeypatched_evaluator_scores_nothing(standin, tmp_path):
    cheat = "import prepare\nprepare.evaluate_bpb = evaluate_bpb = lambda *a, **k: 0.5"
    result, out = _result(standin, tmp_path, _seed(after_imports=cheat))
    assert "| val_bpb:          0.500000" in out  # it printed its number ...
    assert result.status == "crash" and math.isnan(result.val_bpb), out  # ... and handed no model over


def test_a_printed_val_bpb_is_only_compared(standin, tmp_path):
    forged = 'import os; print("OFFLINE", os.environ.get("HF_HUB_OFFLINE")); print("---"); print("val_bpb:          0.100000")'
    result, out = _result(standin, tmp_path, _seed(after_imports=forged))
    assert result.status == "success" and result.val_bpb > 1.0, out
    assert "| OFFLINE 1" in out  # the host's provisioned variables reach the run
    assert result.summary["printed_val_bpb"] == "0.100000" and result.summary["printed_bpb_mismatch"] == "1"


VAL_BY_C = """
import ctypes, os, prepare
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME).encode(), 0)
buf = ctypes.create_string_buffer(64)
print('VAL-READ' if fd >= 0 and libc.read(fd, buf, 64) > 0 else 'VAL-BLOCKED')
"""


def test_the_validation_split_cannot_be_read(standin, tmp_path):
    result, out = _result(standin, tmp_path / "c", _seed(after_imports=VAL_BY_C))
    assert "VAL-BLOCKED" in out and "VAL-READ" not in out, out
    assert result.status == "success"
    loader = "make_dataloader(Tokenizer.from_directory(), 8, MAX_SEQ_LEN, 'val')"
    result, out = _result(standin, tmp_path / "py", _seed(replace=(
        'make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")', loader)))
    assert result.status == "crash" and "training split only" in out, out


@pytest.mark.parametrize("edit,why", [
    (("is_causal=True", "is_causal=False"), "later tokens change"),
    (("reduction=reduction)", "reduction=reduction) * 0.5"), "not a normalised prediction"),
])
def test_a_model_that_is_not_a_causal_lm_is_a_violation(standin, tmp_path, edit, why):
    result, out = _result(standin, tmp_path, _seed(replace=edit))
    assert result.status == "harness_violation" and why in result.detail and math.isnan(result.val_bpb), out


def test_runner_editing_prepare_is_a_violation(standin, tmp_path):
    result, out = _result(standin, tmp_path, _seed(after_imports="open('prepare.py', 'a').write('# better\\n')"))
    assert result.status == "harness_violation" and math.isnan(result.val_bpb), out
    assert result.summary["prepare_sha256_before"] != result.summary["prepare_sha256_after"]


def test_runner_crash_and_syntax_error(standin, tmp_path):
    crash, _ = _result(standin, tmp_path / "a", "raise SystemExit('CUDA out of memory')\n")
    assert crash.status == "crash" and "CUDA out of memory" in crash.detail and math.isnan(crash.val_bpb)
    syntax, _ = _result(standin, tmp_path / "b", "def f(:\n")
    assert syntax.status == "syntax_error"


def test_runner_unpinned_prepare_is_infra_error(standin, tmp_path):
    pins = tmp_path / "other-pins"
    pins.write_text(f"url = x\ncommit = {'0' * 40}\nprepare_sha256 = {'f' * 64}\ntrain_sha256 = {'0' * 64}\n")
    result, _ = _result(standin, tmp_path, "print('hi')\n", pins)
    assert result.status == "infra_error" and "pinned" in result.detail


def test_job_runs_the_host_runner_on_the_slot():
    slot = Slot("gpu-3", "ssh", "node1", (), 3, "/opt/py/bin/python", "/srv/rfs")
    job = AutoresearchEnv(CFG).job("print(1)\n", slot, "r1")
    assert job.argv[:3] == ("/opt/py/bin/python", "-m", "rfs.envs.autoresearch")
    assert "/srv/rfs/env/autoresearch/checkout" in job.argv and job.env["CUDA_VISIBLE_DEVICES"] == "3"
    assert job.files == {"train.py": b"print(1)\n"} and job.timeout_s == CFG.timeout_s


# --- the depth-12 transfer probe, run for real on the stand-in -------------------------------------

TRANSFER_LOOP = LoopSpec("A-S", "gold", "A", "S")


def _transfer_probe(standin, root: Path, best: str) -> RunDir:
    """The loop's probe of A-S V2 with only the transfer missing: zero-shot and code on record, and a
    zero-shot rollout whose final train.py is `best`; two local slots run the stand-in's runner."""
    checkout, pins, _ = standin
    cfg = config.load(None, {
        "experiment": {"preset": "cluster", "name": "transfer-test", "seed": 0},
        "env": {"name": "autoresearch", "budget_s": BUDGET, "timeout_s": 120.0, "device": "cpu"},
        "researcher": {"backend": "external", "base_url": "http://127.0.0.1:9/v1", "model": "scripted"},
    })
    run = RunDir(root)
    row = trace.new_row(experiment="transfer-test", loop=PROBE, arc="A", round=2, version=2, rollout_id="zs0",
                        status="success", val_bpb=3.0, final_train_py=best)
    path = run.probes("A-S").traces(PROBE, 2)
    path.parent.mkdir(parents=True)
    pq.write_table(trace.to_table([row], validated=True), path)
    metrics.record_version_eval(run, [metrics.version_eval_row("transfer-test", "A", "A-S", 2, p, [1.0], "recorded")
                                      for p in ("zero_shot", "code")])
    env = AutoresearchEnv(cfg.env, checkout=str(checkout), pins=pins)
    slots = [Slot(f"s{i}", "local", "localhost", (), -1, sys.executable, str(Path.cwd())) for i in range(2)]

    async def probe() -> None:
        events = EventLog(run.events)
        try:
            async with Servers(cfg, HostsFile(), run, events, None) as servers:
                ex = Experiment(cfg, run, HostsFile(), events, env, SlotPool(slots, cfg.collect, events), servers,
                                Noise(3.0, 0.01, 3), None, ExperimentState.from_json({}, "transfer-test"))
                await evals.evaluate(ex, TRANSFER_LOOP, 2)
        finally:
            events.close()

    anyio.run(probe)
    return run


@pytest.mark.slow  # six stand-in runs (three of the version, three of the seed) on two slots
def test_the_transfer_probe_runs_the_version_and_the_seed_at_depth_12(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(standin[2]))  # where the stand-in's prepare.py finds its data
    best = _seed(replace=("LEARNING_RATE = 3e-3 ", "LEARNING_RATE = 1e-2 "))
    run = _transfer_probe(standin, tmp_path / "run", best)
    rows = metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL).to_pylist()
    row = next(r for r in rows if r["probe"] == "transfer")
    assert (row["n"], row["n_ok"]) == (3, 3), row["detail"]
    assert row["detail"].startswith("3/3 runs at DEPTH=12 (success, success, success); seed train.py at DEPTH=12, "
                                    "same seeds: 3/3 ok"), row["detail"]
    log = zstandard.ZstdDecompressor().decompress(run.probes("A-S").transfer_log(2).read_bytes(), max_output_size=1 << 26)
    sections = {s.split(" ", 1)[0]: s for s in log.decode().split("=== ")[1:]}
    assert sorted(sections) == sorted(f"A-S-v2-{s}transfer{i}" for s in ("", "seed-") for i in range(3))
    harness = {}
    for rid, text in sections.items():
        # what ran is the stand-in at depth 12, as its own config line shows it (echoed by the harness)
        assert "status=success" in text and "| Model config: {'n_layer': 12," in text and "'n_layer': 8" not in text, text
        harness[rid] = parse_autoresearch(text)  # the runner's summary, not train.py's ("| "-prefixed)
    # the recorded values are the harness's own val_bpb lines of the version's runs, in run order
    bpb = {rid: float(s["val_bpb"]) for rid, s in harness.items()}
    assert row["values"] == pytest.approx([bpb[f"A-S-v2-transfer{i}"] for i in range(3)])
    assert all(1.0 < v < 9.0 for v in bpb.values())
    seed_mean = sum(bpb[f"A-S-v2-seed-transfer{i}"] for i in range(3)) / 3
    assert f"mean {seed_mean:.4f}" in row["detail"]
    # the version's train.py ran, not the seed's: what the harness hashed is each side's file at depth 12
    for prefix, src in (("", best), ("seed-", (STANDIN / "train.py").read_text())):
        want = hashlib.sha256(probes.transfer_train_py(src, 12).encode()).hexdigest()
        assert {harness[f"A-S-v2-{prefix}transfer{i}"]["train_py_sha256"] for i in range(3)} == {want}


def test_the_transfer_probe_on_a_file_without_a_depth_is_not_applicable(standin, tmp_path):
    best = _seed(replace=("DEPTH = 8               # number of transformer layers\n", ""))
    run = _transfer_probe(standin, tmp_path / "run", best)  # no run starts: nothing to confine or to wait for
    row = next(r for r in metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL).to_pylist()
               if r["probe"] == "transfer")
    assert row["n"] == 0 and row["detail"].startswith("not applicable: train.py has no module-level `DEPTH = <int>`")
    assert not run.probes("A-S").transfer_log(2).exists()
