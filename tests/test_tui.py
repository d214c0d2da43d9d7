"""The watch TUI: the events → view reduction, trace lookup, plain progress, and the Textual app
driven by a pilot against a real run directory (the sample event log plus real Parquet rows)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from rfs import atomic, trace
from rfs.events import EventLog, read_events
from rfs.rundir import RunDir
from rfs.tui import transcript
from rfs.tui.model import RunView
from rfs.tui.plain import describe, plain_progress
from rfs.tui.tail import LogTail

SAMPLE = Path(__file__).parent / "data" / "events_sample.jsonl"
ROOT = Path(__file__).parent.parent


def sample_view() -> RunView:
    return RunView().apply_all(read_events(SAMPLE)[0])


def trace_row(**over):
    """A valid trace row: a success, then the overrides."""
    return trace.new_row(**{"status": "success", "val_bpb": 1.362, "steps": 940, "exit_code": 0, **over})


def run_dir(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    shutil.copy(SAMPLE, run.events)
    return run


# ── the reduction ─────────────────────────────────────────────────────────────────────────────


def test_sample_log_reduces_to_the_live_picture():
    v = sample_view()
    assert v.experiment == "embedded-demo" and not v.finished
    assert list(v.loops) == ["A-S", "A-F", "CTRL", "FLOOR", "shared"]  # "v0" (a server key) is no loop
    assert (v.phase, v.server) == ("", "up v0/v0")  # calibration is over; frozen V0 serves the baselines
    s = v.loops["A-S"]
    assert (s.round, s.phase, s.version, s.server) == (3, "collect", "v2", "up")
    states = {r.rollout_id: r.state for r in s.round_rollouts()}
    assert states == {
        "A-S-r3-t000": "success 1.3620",
        "A-S-r3-t001": "success 1.3660 (reading)",
        "A-S-r3-t002": "running on local-3",
        "A-S-r3-t003": "thinking",
    }
    assert s.round_summary() == "1/4 done, 1 success, best 1.3620"
    assert v.slots == {"local-0": "", "local-1": "", "local-2": "", "local-3": "A-S-r3-t002"}
    assert set(v.quarantined) == {"local-2"}
    assert (v.loops["FLOOR"].phase, v.loops["FLOOR"].paused) == ("paused", "collapse guard: success rate 0.25 below 0.5 twice")
    assert [a.kind for a in v.alarms] == ["quarantine", "collapse", "paused", "drift"]  # quarantine once
    assert v.last_scheduler == "start loop=FLOOR"


def test_trajectory_is_best_per_round_starting_from_the_shared_round():
    v = sample_view()
    assert v.trajectory("A-S") == [1.398, 1.371, 1.362]  # round 3 is live: its best so far
    assert v.trajectory("A-F") == [1.398, 1.390]
    assert v.trajectory("shared") == [1.398]
    assert v.trajectory("nobody") == [1.398]


def test_a_replayed_rollout_starts_over_and_collecting_again_unpauses():
    v = sample_view()
    v.apply({"t": 1, "kind": "rollout_started", "loop": "A-S", "round": 3, "rollout_id": "A-S-r3-t001", "thread": 1})
    assert v.loops["A-S"].round_rollouts()[1].state == "thinking" and v.loops["A-S"].round_rollouts()[1].turns == 0
    v.apply({"t": 2, "kind": "phase", "loop": "FLOOR", "round": 3, "phase": "collect"})
    assert v.loops["FLOOR"].paused == "" and v.loops["FLOOR"].round == 3


def test_failed_runs_show_their_status_and_never_count_as_best():
    v = RunView().apply_all([
        {"t": 1, "kind": "rollout_started", "loop": "S", "round": 2, "rollout_id": "a", "thread": 0},
        {"t": 2, "kind": "turn", "loop": "S", "round": 2, "rollout_id": "a", "turn": 0, "valid": False},
        {"t": 3, "kind": "run_started", "loop": "S", "round": 2, "rollout_id": "a", "slot": "g0"},
        {"t": 4, "kind": "run_finished", "loop": "S", "round": 2, "rollout_id": "a", "slot": "g0",
         "status": "crash", "val_bpb": math.nan, "steps": 0},
    ])
    r = v.loops["S"].round_rollouts()[0]
    assert (r.state, r.invalid_turns, v.slots["g0"]) == ("crash (reading)", 1, "")
    # the rollout's final status is the truth, even when it differs from the run's
    v.apply({"t": 5, "kind": "rollout_finished", "loop": "S", "round": 2, "rollout_id": "a",
             "status": "infra_error", "val_bpb": math.nan})
    assert r.state == "infra_error" and v.trajectory("S") == []
    assert v.loops["S"].round_summary() == "1/1 done, 0 success"


def test_cancelled_rollout_frees_its_slot():
    v = RunView().apply_all([
        {"t": 1, "kind": "run_started", "loop": "F", "round": 1, "rollout_id": "b", "slot": "g1"},
        {"t": 2, "kind": "rollout_finished", "loop": "F", "round": 1, "rollout_id": "b", "status": "timeout",
         "val_bpb": None},
    ])
    assert v.slots == {"g1": ""} and v.loops["F"].round_rollouts()[0].state == "timeout"


def test_odd_events_are_tolerated_and_versions_read_one_way():
    v = RunView().apply_all([
        {"t": 1, "kind": "from_a_newer_writer", "loop": "S", "whatever": [1, 2]},
        {"kind": "turn", "loop": "S", "round": 4, "rollout_id": "mid-run"},  # log opened mid-wave
        {"t": 2, "kind": "consolidated", "loop": "S", "round": 4, "version": 5},
        {"t": 3, "kind": "server_crashed", "version": "S/v5", "base_url": "http://x"},
        {"t": 3, "kind": "server_started", "version": "Qwen/Qwen2.5-Coder-7B-Instruct"},  # no loop's
        {"t": 4, "kind": "wave_finished", "loop": "S", "round": 4, "best_val_bpb": "nan"},
        {"t": 5, "kind": "experiment_finished", "experiment": "e"},
    ])
    s = v.loops["S"]
    assert (s.round, s.version, s.server) == (4, "v5", "crashed")
    assert v.server == "up Qwen/Qwen2.5-Coder-7B-Instruct" and list(v.loops) == ["S"]
    assert s.round_rollouts()[0].state == "thinking"
    assert v.trajectory("S") == [] and v.finished and v.last_t == 5
    assert [a.kind for a in v.alarms] == ["server"]


def test_wave_finished_supplies_best_when_rollout_events_were_missed():
    v = RunView().apply_all([{"t": 1, "kind": "wave_finished", "loop": "CTRL", "round": 2, "best_val_bpb": 1.4}])
    assert v.trajectory("CTRL") == [1.4]


def test_sparkline_has_one_bar_per_round_scaled_to_the_range():
    from rfs.tui.app import sparkline

    assert sparkline([1.398, 1.371, 1.362]) == "█▃▁"
    assert sparkline([1.4, 1.4]) == "▁▁" and sparkline([]) == ""


# ── trace lookup ──────────────────────────────────────────────────────────────────────────────

MESSAGES = [
    {"role": "system", "content": "You edit train.py.", "reasoning": ""},
    {"role": "assistant", "content": '{"action": "edit", "name": "lr", "value": 0.02}', "reasoning": "try a larger lr"},
    {"role": "tool", "content": "val_bpb: 1.362", "reasoning": ""},
]
DIFF = "--- a/train.py\n+++ b/train.py\n-lr = 0.01\n+lr = 0.02\n"


def test_trace_is_found_in_its_pending_file_then_in_the_compacted_round(tmp_path):
    run = RunDir(tmp_path)
    mine = trace_row(loop="S", round=3, rollout_id="S-3-00", messages=MESSAGES, diff=DIFF)
    atomic.write_bytes(run.pending_row("S", 3, "S-3-00"), trace.dumps(mine))
    assert transcript.load_trace(run, "S", 3, "S-3-00")["diff"] == DIFF
    other = trace_row(loop="F", round=2, rollout_id="F-2-01", status="crash", val_bpb=math.nan, detail="exit 1")
    atomic.write_parquet(run.traces("F", 2), trace.to_table([trace_row(loop="F", round=2, rollout_id="F-2-00"), other]))
    row = transcript.load_trace(run, "F", 2, "F-2-01")
    assert (row["rollout_id"], row["status"]) == ("F-2-01", "crash")
    assert transcript.load_trace(run, "F", 2, "F-2-09") is None
    assert transcript.load_trace(run, "S", 3, "S-3-01") is None


def test_render_shows_messages_thoughts_and_diff():
    text = transcript.render(trace_row(loop="S", round=3, rollout_id="S-3-00", version="v2", slot="slot-0",
                                       messages=MESSAGES, diff=DIFF))
    assert "status success  val_bpb 1.3620  steps 940" in text
    assert "(thought) try a larger lr" in text and "val_bpb: 1.362" in text
    assert text.index("── tool") < text.index("── diff") < text.index("+lr = 0.02")
    failed = transcript.render(trace_row(status="syntax_error", val_bpb=math.nan, detail="line 3: invalid syntax"))
    assert "val_bpb" not in failed and "line 3: invalid syntax" in failed and "(no diff)" in failed


# ── following the file ────────────────────────────────────────────────────────────────────────


def test_tail_reads_new_lines_notices_a_restart_and_names_a_bad_line(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = LogTail(path)
    assert tail.read() == ([], False)  # not written yet
    path.write_text('{"t": 1, "kind": "a"}\n{"t": 2, "kind": "b"}\n{"t": 3, "ki')
    assert [e["kind"] for e in tail.read()[0]] == ["a", "b"]  # the half line waits
    with open(path, "a") as f:
        f.write('nd": "c"}\n')
    assert [e["kind"] for e in tail.read()[0]] == ["c"]
    path.write_text('{"t": 9, "kind": "fresh"}\n')  # a new run in the same place
    assert tail.read() == ([{"t": 9, "kind": "fresh"}], True)
    with open(path, "a") as f:
        f.write('torn{"t": 1\n{"t": 10, "kind": "after"}\n')  # a killed writer's torn line is skipped
    assert tail.read() == ([{"t": 10, "kind": "after"}], False)


# ── plain progress ────────────────────────────────────────────────────────────────────────────


def test_plain_progress_prints_one_line_per_event_without_turns(tmp_path, capsys):
    run = run_dir(tmp_path)
    plain_progress(run.root, follow=False)
    lines = capsys.readouterr().out.splitlines()
    events = read_events(SAMPLE)[0]
    assert len(lines) == sum(e["kind"] != "turn" for e in events)
    assert any(" rollout_finished loop=A-S round=3 rollout_id=A-S-r3-t000 status=success val_bpb=1.362" in ln for ln in lines)
    assert any(" run_finished loop=A-F round=2 rollout_id=A-F-r2-t001 status=timeout val_bpb=nan slot=local-1" in ln for ln in lines)


def test_plain_progress_on_a_fresh_or_missing_run(tmp_path, capsys):
    plain_progress(tmp_path, follow=False)
    assert "no events yet" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        plain_progress(tmp_path / "nope", follow=False)


def test_describe_puts_identity_first():
    line = describe({"t": 0, "kind": "wave_finished", "n": 4, "round": 2, "loop": "S", "best_val_bpb": 1.371})
    assert line.split(" ", 1)[1] == "wave_finished loop=S round=2 n=4 best_val_bpb=1.371"


def test_watch_without_a_terminal_follows_as_plain_lines_until_the_experiment_ends(tmp_path):
    run = run_dir(tmp_path)
    code = f"from rfs.tui import watch; watch({str(run.root)!r})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # it is following: the log so far is being printed
    assert "experiment_started experiment=embedded-demo" in first
    resumed = [  # a finish, then a resume: one write, so the follower sees both or neither
        {"t": 1.0, "kind": "experiment_finished", "experiment": "embedded-demo"},
        {"t": 2.0, "kind": "experiment_started", "experiment": "embedded-demo", "resumed": True},
    ]
    with open(run.events, "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in resumed))
    log = EventLog(run.events)
    log.emit("rollout_finished", loop="A-S", round=3, rollout_id="A-S-r3-t003", status="no_edit", val_bpb=math.nan)
    log.emit("experiment_finished", experiment="embedded-demo")
    log.close()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "rollout_id=A-S-r3-t003 status=no_edit" in out and out.rstrip().endswith("experiment=embedded-demo")


# ── the app, driven by a pilot ────────────────────────────────────────────────────────────────


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector).content)


def table_rows(app) -> dict[str, list[str]]:
    from textual.widgets import DataTable

    table = app.query_one(DataTable)
    return {str(k.value): [str(c) for c in table.get_row(k)] for k in table.rows}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.anyio
async def test_app_shows_arms_rollouts_slots_and_alarms(tmp_path):
    from rfs.tui.app import WatchApp

    run = run_dir(tmp_path)
    app = WatchApp(run.root)
    async with app.run_test(size=(130, 36)) as pilot:
        await pilot.pause()
        assert "embedded-demo" in text_of(app, "#title") and "server up v0/v0" in text_of(app, "#title")
        assert text_of(app, "#loop").startswith("loop A-S  round 3 (live)  phase collect  researcher v2  server up")
        rows = table_rows(app)
        assert rows["A-S-r3-t000"][-1] == "success 1.3620" and rows["A-S-r3-t002"][-1] == "running on local-3"
        assert "1/4 done, 1 success, best 1.3620  last LoRA loss 1.330 kl 0.018" in text_of(app, "#loop")
        assert text_of(app, "#trajectory") == "1.398 → 1.371 → 1.362"
        slots = text_of(app, "#slots")
        assert "local-2  QUARANTINED" in slots and "local-3  A-S-r3-t002" in slots and "local-0  idle" in slots
        assert "drift A-F val_bpb improved" in text_of(app, "#alarms")
        await pilot.press("tab")
        assert text_of(app, "#loop").startswith("loop A-F  round 2 (live)  phase consolidate  researcher v2")
        assert table_rows(app)["A-F-r2-t001"][-1] == "timeout"
        await pilot.press("4")
        assert "phase paused" in text_of(app, "#loop") and "PAUSED: collapse guard" in text_of(app, "#loop")
        await pilot.press("5", "shift+tab")
        assert text_of(app, "#loop").startswith("loop FLOOR")


@pytest.mark.anyio
async def test_app_follows_the_file_as_it_grows(tmp_path):
    from rfs.tui.app import WatchApp

    run = run_dir(tmp_path)
    app = WatchApp(run.root, poll_s=0.05)
    async with app.run_test(size=(130, 36)) as pilot:
        log = EventLog(run.events)
        log.emit("run_finished", loop="A-S", round=3, rollout_id="A-S-r3-t002", slot="local-3", status="crash",
                 val_bpb=math.nan, steps=0)
        log.close()
        deadline = time.monotonic() + 30  # a hang guard, not a timing assertion
        while table_rows(app)["A-S-r3-t002"][-1] != "crash (reading)" and time.monotonic() < deadline:
            await pilot.pause(0.05)
        assert table_rows(app)["A-S-r3-t002"][-1] == "crash (reading)"
        assert "local-3  idle" in text_of(app, "#slots")
        run.events.write_text('{"t": 1, "kind": "experiment_started", "experiment": "again"}\n')
        while "again" not in text_of(app, "#title") and time.monotonic() < deadline:
            await pilot.pause(0.05)
        assert "again" in text_of(app, "#title") and not table_rows(app)  # a new run: nothing left over


@pytest.mark.anyio
async def test_enter_opens_the_transcript_and_q_quits_without_touching_the_run(tmp_path):
    from rfs.tui.app import TranscriptScreen, WatchApp

    run = run_dir(tmp_path)
    row = trace_row(loop="A-S", round=3, rollout_id="A-S-r3-t000", version="v2", messages=MESSAGES, diff=DIFF)
    atomic.write_bytes(run.pending_row("A-S", 3, "A-S-r3-t000"), trace.dumps(row))
    run.pending_row("A-S", 3, "A-S-r3-t001").write_bytes(b"not json")  # say, a foreign file
    before = tree_bytes(run.root)
    app = WatchApp(run.root)
    async with app.run_test(size=(130, 36)) as pilot:
        await pilot.press("enter")
        assert isinstance(app.screen, TranscriptScreen)
        shown = text_of(app, "#transcript")
        assert "(thought) try a larger lr" in shown and "+lr = 0.02" in shown
        await pilot.press("3")  # loop keys do nothing behind a transcript
        assert isinstance(app.screen, TranscriptScreen) and app.selected == 0
        await pilot.press("escape", "down", "down", "enter")  # t002 is still running: no row yet
        assert "A-S-r3-t002: no trace row yet (still in flight)" in text_of(app, "#transcript")
        await pilot.press("escape", "up", "enter")
        assert "A-S-r3-t001: cannot read its trace" in text_of(app, "#transcript")
        await pilot.press("escape", "q")
        await pilot.pause()
        assert not app.is_running
    assert tree_bytes(run.root) == before


@pytest.mark.anyio
async def test_screenshot_of_the_sample(tmp_path):
    from rfs.tui.screenshot import screenshot

    svg = await screenshot(run_dir(tmp_path).root, tmp_path / "tui.svg", keys=("tab",))
    assert (tmp_path / "tui.svg").read_text() == svg and "A-F-r2-t001" in svg and svg.startswith("<svg")


@pytest.mark.anyio
async def test_brackets_browse_earlier_rounds_and_open_their_compacted_traces(tmp_path):
    from rfs.tui.app import WatchApp

    run = run_dir(tmp_path)
    rows = [trace_row(loop="A-S", round=2, rollout_id=f"A-S-r2-t00{i}", val_bpb=1.371 + i / 100) for i in range(2)]
    rows[1]["messages"] = [{"role": "assistant", "content": '{"action": "finish"}', "reasoning": "enough"}]
    atomic.write_parquet(run.traces("A-S", 2), trace.to_table(rows))
    app = WatchApp(run.root)
    async with app.run_test(size=(130, 36)) as pilot:
        await pilot.press("[")
        assert text_of(app, "#loop").startswith("loop A-S  round 2 of 3 (] for live)")
        assert table_rows(app)["A-S-r2-t002"][-1] == "no_edit"
        await pilot.press("[")  # A-S has no round-1 rollouts of its own: stays on round 2
        assert "round 2 of 3" in text_of(app, "#loop")
        await pilot.press("down", "enter")
        assert '{"action": "finish"}' in text_of(app, "#transcript")
        await pilot.press("escape", "]")
        assert "round 3 (live)" in text_of(app, "#loop") and "A-S-r3-t000" in table_rows(app)
        await pilot.press("[", "2")  # switching loop goes back to following the live round
        assert text_of(app, "#loop").startswith("loop A-F  round 2 (live)")


@pytest.mark.anyio
async def test_app_on_a_run_with_no_events_yet_waits_for_them(tmp_path):
    from rfs.tui.app import WatchApp

    app = WatchApp(tmp_path)
    async with app.run_test(size=(100, 24)) as pilot:
        await pilot.press("tab", "2", "[", "enter")  # nothing to switch to or open: no error
        assert "waiting for events in" in text_of(app, "#loops") and not table_rows(app)
        assert text_of(app, "#slots") == "no runs yet" and text_of(app, "#alarms") == "none"


def test_watch_on_a_terminal_draws_the_run_and_q_leaves_it_untouched(tmp_path):
    import pty
    import select

    run = run_dir(tmp_path)
    before = tree_bytes(run.root)
    master, child = pty.openpty()
    code = f"from rfs.tui import watch; watch({str(run.root)!r})"
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "30"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=child, stdout=child,
                            stderr=child, start_new_session=True)
    os.close(child)
    seen, deadline = b"", time.monotonic() + 60  # a hang guard, not a timing assertion
    try:
        while b"A-S-r3-t002" not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 65536)
        assert b"A-S-r3-t002" in seen, seen[-2000:]
        os.write(master, b"q")
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    os.read(master, 65536)  # keep draining so the app never blocks on a full pty
                except OSError:
                    break
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert tree_bytes(run.root) == before
