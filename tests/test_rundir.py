import json
import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from rfs import atomic
from rfs.events import EventLog, read_events
from rfs.rundir import Lock, RunDir, RunLocked


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "state.json"
    atomic.write_json(p, {"round": 1})
    atomic.write_json(p, {"round": 2})
    assert json.loads(p.read_text()) == {"round": 2}
    assert [f.name for f in p.parent.iterdir()] == ["state.json"], "no temp files left behind"


def test_atomic_write_survives_kill_mid_write(tmp_path):
    """A writer killed at a random instant leaves the old or the new file, never a torn one."""
    p = tmp_path / "state.json"
    atomic.write_json(p, {"v": 0})
    code = textwrap.dedent(f"""
        from rfs import atomic
        i = 0
        while True:
            i += 1
            atomic.write_json({str(p)!r}, {{"v": i, "pad": "x" * 200000}})
    """)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            proc.wait(timeout=0.4)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        json.loads(p.read_text())  # parses: never torn


def test_parquet_write(tmp_path):
    import pyarrow as pa

    p = tmp_path / "m.parquet"
    atomic.write_parquet(p, pa.table({"x": [1, 2]}))
    assert pq.read_table(p).column("x").to_pylist() == [1, 2]


def test_second_controller_is_refused(tmp_path):
    with Lock(tmp_path):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            Lock(tmp_path).acquire()
    Lock(tmp_path).acquire()  # released: free again


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    code = f"from rfs.rundir import Lock; import time; Lock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked):
        Lock(tmp_path).acquire()
    proc.kill()
    proc.wait()
    Lock(tmp_path).acquire()


def test_events_append_and_tail(tmp_path):
    run = RunDir(tmp_path)
    log = EventLog(run.events)
    log.emit("rollout_started", loop="A-S", round=1, rollout_id="r1")
    events, off = read_events(run.events)
    assert [e["kind"] for e in events] == ["rollout_started"]
    with open(run.events, "ab") as f:
        f.write(b'{"kind": "half')  # a writer killed mid-line
    assert read_events(run.events, off) == ([], off), "an unfinished line is not read yet"
    log.close()
    log = EventLog(run.events)  # the next controller ends the torn line before writing
    log.emit("rollout_finished", loop="A-S", round=1, rollout_id="r1", status="success", val_bpb=1.5)
    more, _ = read_events(run.events, off)
    assert [e["kind"] for e in more] == ["rollout_finished"]
