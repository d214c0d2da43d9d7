"""Progress on every long phase: calibration, fits, swaps, probes and waves say how far they are and
how long is left, in the TUI model and in plain lines alike; the TUI follows the live loop and an
idle loop says why it is idle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rfs.events import EventLog, iter_events, read_events
from rfs.progress import PlainLines, duration
from rfs.rundir import RunDir
from rfs.tui.model import RunView

SAMPLE = Path(__file__).parent / "data" / "events_sample.jsonl"
T0 = 1_800_000_000.0


def ev(kind: str, t: float, **fields) -> dict:
    return {"t": T0 + t, "kind": kind, **fields}


CALIBRATION = [
    ev("experiment_started", 0, experiment="quick"),
    ev("phase", 1, loop="*", round=0, phase="calibrate", k=5),
    ev("calibrate_run", 61, loop="*", run=0, k=5, status="success", val_bpb=1.41, steps=900),
    ev("calibrate_run", 121, loop="*", run=1, k=5, status="success", val_bpb=1.40, steps=910),
]
FIT = [
    ev("phase", 0, loop="A-S", round=2, phase="consolidate"),
    ev("train_step", 10, loop="A-S", round=2, step=1, total=40, tokens=500, loss=2.0, kl=0.0),
    ev("train_step", 12, loop="A-S", round=2, step=2, total=40, tokens=500, loss=1.9, kl=0.0),
    ev("train_step", 14, loop="A-S", round=2, step=3, total=40, tokens=500, loss=1.8, kl=0.0),
]


def test_duration_reads_at_a_glance():
    assert [duration(s) for s in (4.6, 65, 3600 + 120)] == ["5s", "1m05s", "1h02m"]


def test_calibration_says_run_k_of_K_the_values_and_the_time_left():
    v = RunView().apply_all(CALIBRATION)
    # 2 runs took 120 s: the 3 left take 180 s more at that pace
    assert v.activities(T0 + 121) == [
        "calibrating the seed train.py: run 2/5 done, val_bpb 1.4100 1.4000, 2m00s so far, ~3m00s left"]
    assert v.activities(T0 + 151)[0].endswith("2m30s so far, ~2m30s left")  # the clock runs between events
    lines = PlainLines()
    printed = [lines.line(e) for e in CALIBRATION]
    assert printed[-1].endswith("run 2/5 done, val_bpb 1.4100 1.4000, 2m00s so far, ~3m00s left")


def test_a_failed_calibration_run_is_counted_and_its_value_not_shown():
    v = RunView().apply_all([*CALIBRATION, ev("calibrate_run", 181, loop="*", run=2, k=5, status="crash",
                                              val_bpb=float("nan"))])
    assert "run 3/5 done, 1 failed, val_bpb 1.4100 1.4000" in v.activities(T0 + 181)[0]


def test_a_fit_says_step_of_steps_tokens_per_second_loss_and_time_left():
    v = RunView().apply_all(FIT)
    # 2 s a step after the first, 1000 tokens in 4 s; 37 steps left at 2 s
    assert v.activities(T0 + 14) == ["A-S fit round 2: step 3/40, 250 tok/s, loss 1.800, ~1m14s left"]
    assert v.activities(T0 + 20) == ["A-S fit round 2: step 3/40, 250 tok/s, loss 1.800, ~1m08s left"]
    lines = PlainLines()
    tails = [lines.line(e).split(" ", 1)[1] for e in FIT]  # after the HH:MM:SS stamp
    assert tails[1:] == ["A-S fit round 2: step 1/40, loss 2.000, time left unknown yet",
                         "A-S fit round 2: step 2/40, 250 tok/s, loss 1.900, ~1m16s left",
                         "A-S fit round 2: step 3/40, 250 tok/s, loss 1.800, ~1m14s left"]


def test_a_fit_waiting_for_another_says_so_and_preparation_is_shown():
    v = RunView().apply_all([*FIT, ev("phase", 15, loop="A-F", round=2, phase="consolidate")])
    assert v.idle_reason("A-F") == "waiting for A-S's fit to end (one fit at a time)"
    v = RunView().apply_all(FIT[:1])
    assert v.activities(T0 + 30) == ["A-S fit round 2: preparing (dataset, KL anchor, model load), 30s so far"]


def test_probes_and_swaps_say_what_is_done_and_what_the_last_one_took():
    v = RunView().apply_all([
        ev("phase", 0, loop="A-S", round=1, phase="eval", probes=["zero_shot", "code", "transfer"]),
        ev("phase", 0, loop="A-S", round=2, phase="swap", version="A-S/v1"),
        ev("server_restarted", 40, version="A-S/v1"),
        ev("probe_done", 100, loop="A-S", round=1, probe="zero_shot"),
        ev("phase", 300, loop="A-S", round=1, phase="eval_done", missing=[]),
        ev("phase", 400, loop="A-S", round=3, phase="swap", version="A-S/v2"),
        ev("phase", 401, loop="A-S", round=2, phase="eval", probes=["zero_shot", "code", "transfer"]),
        ev("probe_done", 500, loop="A-S", round=2, probe="zero_shot"),
    ])
    assert v.activities(T0 + 410) == [
        "loading researcher A-S/v2 (convert, start the server): 10s so far, the last took 40s",
        "A-S probes of v2: 1/3 done (code transfer to go), 9s so far, ~4m51s left",
    ]


def test_a_wave_estimates_its_end_from_the_rollouts_done():
    v = RunView().apply_all([
        ev("phase", 0, loop="CTRL", round=2, phase="collect"),
        *[ev("rollout_started", 1, loop="CTRL", round=2, rollout_id=f"c{i}", thread=i) for i in range(4)],
        ev("run_started", 2, loop="CTRL", round=2, rollout_id="c1", slot="local-1"),
        ev("rollout_finished", 60, loop="CTRL", round=2, rollout_id="c0", status="success", val_bpb=1.4),
    ])
    assert v.activities(T0 + 60) == ["CTRL round 2 wave: 1/4 rollouts done, 1 training runs on slots, 1m00s so far, "
                                     "~3m00s left"]


def test_idle_loops_say_why():
    v = RunView().apply_all([
        ev("phase", 0, loop="A-S", round=1, phase="collect"),
        ev("phase", 0, loop="CTRL", round=1, phase="collect"),
        ev("phase", 0, loop="FLOOR", round=1, phase="collect"),
        ev("rollout_started", 1, loop="shared", round=1, rollout_id="s0", thread=0),
        ev("loop_paused", 2, loop="FLOOR", reason="collapse guard: success rate 0.25 below 0.5 twice"),
        ev("phase", 3, loop="B-F", round=3, phase="done", reason="reached 3 rounds"),
    ])
    assert v.idle_reason("CTRL") == v.idle_reason("A-S") == (
        "waiting for the shared round 1 (collected once with V0 for every loop)")
    assert v.idle_reason("FLOOR") == "paused by the guard: collapse guard: success rate 0.25 below 0.5 twice"
    assert v.idle_reason("B-F") == "finished: reached 3 rounds"
    assert v.idle_reason("shared") == "" and v.live_loop() == "shared"  # the wave is the shared loop's


def test_the_live_loop_is_kept_while_it_works_then_the_last_one_to_work():
    v = RunView().apply_all(read_events(SAMPLE)[0])
    assert v.live_loop() == "A-S"
    v.apply_all([ev("rollout_started", 10**6, loop="CTRL", round=3, rollout_id="c", thread=0)])
    assert v.live_loop("A-S") == "A-S"  # still working: never yanked away
    v.apply(ev("phase", 10**6 + 1, loop="A-S", round=3, phase="done", reason="reached 3 rounds"))
    assert v.live_loop("A-S") == "CTRL"


def test_the_event_log_prints_progress_lines_when_echoing(tmp_path, capsys):
    log = EventLog(tmp_path / "events.jsonl", echo=True)
    log.emit("phase", loop="*", round=0, phase="calibrate", k=3)
    log.emit("calibrate_run", loop="*", run=0, k=3, status="success", val_bpb=1.41, steps=900)
    log.emit("turn", loop="A-S", round=1, rollout_id="x")
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "phase loop=* round=0 phase=calibrate k=3" in out[0]
    assert "calibrating the seed train.py: run 1/3 done, val_bpb 1.4100" in out[1]


# ── the app follows the live loop ─────────────────────────────────────────────────────────────


@pytest.mark.anyio
async def test_app_opens_on_the_live_loop_follows_it_and_tab_stops_following(tmp_path):
    from rfs.tui.app import WatchApp

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    events = [
        ev("experiment_started", 0, experiment="quick"),
        ev("phase", 1, loop="CTRL", round=1, phase="collect"),
        ev("phase", 2, loop="A-S", round=1, phase="collect"),
        ev("rollout_started", 3, loop="shared", round=1, rollout_id="shared-r1-t000", thread=0),
    ]
    run.events.write_text("".join(json.dumps(e) + "\n" for e in events))
    app = WatchApp(run.root, poll_s=0.05)
    async with app.run_test(size=(130, 36)) as pilot:
        await pilot.pause()
        assert app.current_loop().name == "shared"  # not CTRL, the first tab, which only waits
        assert "shared round 1 wave: 0/1 rollouts done" in str(app.query_one("#now").content)
        await pilot.press("1")
        assert "idle: waiting for the shared round 1" in str(app.query_one("#loop").content)
        assert "no rollouts of its own in round 1" in str(app.query_one("#loop").content)  # not "0/0 done"
        assert not app.following
        await pilot.press("f")
        assert app.current_loop().name == "shared" and app.following


def test_the_fit_reports_total_steps_and_tokens_that_add_up(tmp_path):
    """A real LoRA fit on the tiny model: train_step says step of total and the tokens of each step."""
    import test_consolidate_fit as tcf  # its tiny-model run and config
    import tiny_model
    from rfs.consolidate import consolidate

    v0 = tiny_model.build(tmp_path / "v0")
    run = tcf.new_run(tmp_path / "run")
    out = consolidate(run, "S", 1, v0, v0, tcf.CFG, None, events=EventLog(run.events), device="cpu", seed=1)
    steps = [e for e in iter_events(run.events) if e["kind"] == "train_step"]
    manifest = json.loads((out / "manifest.json").read_text())
    (m,) = pq.read_table(run.metrics("consolidate")).to_pylist()
    assert [e["step"] for e in steps] == list(range(1, manifest["steps"] + 1))
    assert {e["total"] for e in steps} == {manifest["steps"]}
    assert sum(e["tokens"] for e in steps) == m["tokens_seen"]
    shutil.rmtree(tmp_path / "v0")


@pytest.mark.anyio
async def test_app_during_calibration_says_what_runs_and_how_long(tmp_path):
    from rfs.tui.app import WatchApp

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.events.write_text("".join(json.dumps(e) + "\n" for e in CALIBRATION))
    app = WatchApp(run.root, at_last_event=True)
    async with app.run_test(size=(130, 36)) as pilot:
        await pilot.pause()
        assert str(app.query_one("#now").content) == (
            "calibrating the seed train.py: run 2/5 done, val_bpb 1.4100 1.4000, 2m00s so far, ~3m00s left")
        assert str(app.query_one("#loops").content) == "no loop has started yet: the run is in its calibrate phase"
