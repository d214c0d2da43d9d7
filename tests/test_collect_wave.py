"""run_wave end to end: scripted researcher over real HTTP, real processes through the local launcher,
real Parquet and zstd blobs. Skipping finished rollouts is tested by leaving real pending files."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import replace

import anyio
import pyarrow.parquet as pq
import pytest
import zstandard

from rfs import atomic, trace
from rfs.agent.hparams import BEGIN, END
from rfs.events import iter_events
from rfs.rundir import RunDir
from tests.scripted_researcher import ScriptedResearcher
from tests.wave_child import SEED_TRAIN_PY, SleepEnv, plans, specs, wave, wave_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def launches(counter):
    return Counter(counter.read_text().split()) if counter.exists() else Counter()


def test_wave_runs_every_rollout_once_and_writes_the_round(tmp_path):
    counter, n = tmp_path / "launches", 6
    with ScriptedResearcher(plans(n)) as sr:
        out = anyio.run(wave, tmp_path / "run", sr.base_url, SleepEnv(counter, 0.05), n, 2)
    run = RunDir(tmp_path / "run")
    assert out == run.traces("A-S", 1) and not run.pending("A-S", 1).exists()
    rows = pq.read_table(out).to_pylist()
    assert [r["rollout_id"] for r in rows] == [s.rollout_id for s in specs(n)]
    assert [r["status"] for r in rows] == ["success"] * n
    assert [r["val_bpb"] for r in rows] == pytest.approx([1 + (i + 1) / 100 for i in range(n)])
    assert {r["slot"] for r in rows} <= {"s0", "s1"} and all(r["infra_attempts"] == 0 for r in rows)
    assert launches(counter) == Counter(r["rollout_id"] for r in rows)
    blob = zstandard.ZstdDecompressor().decompress((run.root / rows[3]["blob_path"]).read_bytes())
    assert b"val_bpb: 1.040000" in blob and b"training done" in blob
    kinds = Counter(e["kind"] for e in iter_events(run.events))
    assert kinds["rollout_started"] == kinds["rollout_finished"] == kinds["run_started"] == kinds["run_finished"] == n
    assert kinds["wave_finished"] == 1
    # no more than two runs at once: the pool has two slots
    live, peak = 0, 0
    for e in iter_events(run.events):
        live += {"run_started": 1, "run_finished": -1}.get(e["kind"], 0)
        peak = max(peak, live)
    assert peak <= 2


def test_a_finished_round_is_returned_without_running_anything(tmp_path):
    counter, n = tmp_path / "launches", 2
    with ScriptedResearcher(plans(n)) as sr:
        first = anyio.run(wave, tmp_path / "run", sr.base_url, SleepEnv(counter, 0.01), n, 1)
        before = first.read_bytes()
        again = anyio.run(wave, tmp_path / "run", sr.base_url, SleepEnv(counter, 0.01), n, 1)
    assert again == first and again.read_bytes() == before
    assert sum(launches(counter).values()) == n


def test_resume_skips_rollouts_whose_pending_file_exists(tmp_path):
    counter, n = tmp_path / "launches", 5
    run = RunDir(tmp_path / "run")
    with ScriptedResearcher(plans(n)) as sr:
        rows = pq.read_table(anyio.run(wave, run.root, sr.base_url, SleepEnv(counter, 0.01), n, 2)).to_pylist()
        # as if killed after two rollouts finished: their pending files survive, the round file does not
        run.traces("A-S", 1).unlink()
        for r in rows[:2]:
            atomic.write_bytes(run.pending_row("A-S", 1, r["rollout_id"]), trace.dumps(r))
        counter.unlink()
        again = pq.read_table(anyio.run(wave, run.root, sr.base_url, SleepEnv(counter, 0.01), n, 2)).to_pylist()
    assert sorted(launches(counter)) == [r["rollout_id"] for r in rows[2:]]
    assert [r["rollout_id"] for r in again] == [r["rollout_id"] for r in rows]
    stamp = lambda rs: [(r["rollout_id"], r["started_at"], r["finished_at"]) for r in rs]
    assert stamp(again[:2]) == stamp(rows[:2])  # the kept rows are the very rows written before
    assert stamp(again[2:]) != stamp(rows[2:])  # the others were played again


def test_a_dead_researcher_server_is_infra_error_never_the_researchers(tmp_path):
    counter, n = tmp_path / "launches", 3
    sr = ScriptedResearcher(plans(n))
    url = sr.base_url
    sr.kill()  # nothing listens: connection refused on every turn
    cfg = wave_config(infra_retries=1)
    out = anyio.run(lambda: wave(tmp_path / "run", url, SleepEnv(counter, 0.01), n, 1, cfg=cfg))
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["infra_error"] * n
    assert all("researcher server" in r["detail"] and "2 attempt(s)" in r["detail"] for r in rows)
    assert all(math.isnan(r["val_bpb"]) for r in rows) and not counter.exists()
    started = Counter(e["rollout_id"] for e in iter_events(RunDir(tmp_path / "run").events) if e["kind"] == "rollout_started")
    assert set(started.values()) == {2}  # played once, retried once


def test_a_broken_slot_is_retried_elsewhere_then_quarantined(tmp_path):
    counter, n = tmp_path / "launches", 4
    cfg = wave_config(budget_s=0.01, infra_retries=2, quarantine_after=2)
    with ScriptedResearcher(plans(n)) as sr:
        env = SleepEnv(counter, 0.01, broken_slots=frozenset({"s0"}))
        out = anyio.run(lambda: wave(tmp_path / "run", sr.base_url, env, n, 2, cfg=cfg))
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["success"] * n and {r["slot"] for r in rows} == {"s1"}
    assert sum(r["infra_attempts"] for r in rows) == 2  # s0 failed twice, then was taken out
    events = list(iter_events(RunDir(tmp_path / "run").events))
    assert [e["slot"] for e in events if e["kind"] == "slot_quarantined"] == ["s0"]
    assert any(e["kind"] == "alarm" and e["alarm"] == "quarantine" for e in events)


def test_a_rollout_that_raises_becomes_an_infra_error_row_and_the_wave_goes_on(tmp_path):
    counter, n = tmp_path / "launches", 3
    cfg = wave_config(budget_s=0.01, action_space="hparams")
    # the hparams space needs train.py's marked block; rollout 1's start has none, so its rollout raises
    good = f"x = 0\n{BEGIN} ---\nX = 0  # range: [0, 9]\n{END}\n"
    bad = [replace(s, start_train_py=good if s.thread != 1 else "x = 0\n") for s in specs(n)]
    hp = {k: [{"thought": "t", "action": "set", "name": "X", "value": 3}, {"thought": "t", "action": "run"}] for k in plans(n)}
    with ScriptedResearcher(hp) as sr:
        out = anyio.run(lambda: wave(tmp_path / "run", sr.base_url, SleepEnv(counter, 0.01), n, 2, cfg=cfg, specs=bad))
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["success", "infra_error", "success"]
    assert "Traceback" in rows[1]["detail"] and "rollout raised" in rows[1]["detail"]
    alarms = [e for e in iter_events(RunDir(tmp_path / "run").events) if e["kind"] == "alarm"]
    assert [a["alarm"] for a in alarms] == ["rollout_error"]


def test_compaction_flags_anomalies_without_dropping_rows(tmp_path):
    counter, n = tmp_path / "launches", 2
    cfg = wave_config(budget_s=100.0)  # the jobs "train" 0.01 s of a 100 s budget: suspiciously short
    with ScriptedResearcher(plans(n)) as sr:
        out = anyio.run(lambda: wave(tmp_path / "run", sr.base_url, SleepEnv(counter, 0.01), n, 1, cfg=cfg,
                                     calibration={"mean": 1.5, "std": 0.01}))
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["success"] * n
    assert [r["anomaly_flags"] for r in rows] == [["short_training"]] * n


def test_temp_files_of_a_killed_writer_are_swept_and_never_read(tmp_path):
    counter, n = tmp_path / "launches", 2
    run = RunDir(tmp_path / "run")
    litter = [run.pending("A-S", 1) / ".A-S-r1-t000.json.abc.tmp", run.blob("A-S", 1, "A-S-r1-t000").parent / ".A-S-r1-t000.log.zst.x.tmp"]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    with ScriptedResearcher(plans(n)) as sr:
        rows = pq.read_table(anyio.run(wave, run.root, sr.base_url, SleepEnv(counter, 0.01), n, 1)).to_pylist()
    assert [r["status"] for r in rows] == ["success"] * n
    assert not any(p.exists() for p in litter)


def test_seed_controls_run_in_the_wave_and_are_never_the_researchers(tmp_path):
    """The unmodified start file runs beside the rollouts through the same slots and harness: rows
    with seed_control=True, no researcher turn; the round's aggregates leave them out."""
    from rfs.collect import aggregate
    from rfs.collect.wave import seed_controls

    counter, n = tmp_path / "launches", 4
    controls = [replace(s, thread=n + i, rollout_id=f"A-S-r1-c{i:03d}") for i, s in enumerate(specs(2))]
    with ScriptedResearcher(plans(n)) as sr:
        out = anyio.run(lambda: wave(tmp_path / "run", sr.base_url, SleepEnv(counter, 0.05), n, 2, controls=controls))
        asked = len(sr.requests)
    rows = pq.read_table(out).to_pylist()
    ctl = [r for r in rows if r["seed_control"]]
    assert [r["rollout_id"] for r in ctl] == ["A-S-r1-c000", "A-S-r1-c001"]
    assert all(r["status"] == "success" and r["val_bpb"] == pytest.approx(1.0) and r["messages"] == [] for r in ctl)
    assert all(r["final_train_py"] == SEED_TRAIN_PY for r in ctl)
    assert asked == 3 * n  # the researcher was asked for the rollouts only
    assert launches(counter)["A-S-r1-c000"] == 1
    agg = aggregate.aggregate("A-S", 1, rows)
    assert agg["n"] == n and agg["best_val_bpb"] == pytest.approx(1.01)  # the control's 1.00 is not the researcher's
    assert agg["ast_diversity"] == 1.0  # four distinct files; the controls' two copies of the seed are not counted
    assert aggregate.controls(rows)["control_n"] == 2
    finished = [e for e in iter_events(RunDir(tmp_path / "run").events) if e["kind"] == "wave_finished"]
    assert finished[0]["n"] == n and finished[0]["control_n"] == 2
    assert seed_controls(wave_config(rollouts=48).collect) == 6 and seed_controls(wave_config(rollouts=4).collect) == 1
