"""state.json: the typed loop and experiment state, and the files earlier runs wrote (their resume)."""

from __future__ import annotations

import json
import math

from rfs.loop.plan import LoopSpec
from rfs.loop.state import ExperimentState, LoopState, Noise, RoundStats
from rfs.rundir import RunDir

# state.json as the driver wrote it before the state was typed: a dict per loop, elapsed_before_s
OLD = """{
  "elapsed_before_s": 10.0,
  "elapsed_s": 12.5,
  "experiment": "matrix",
  "alarms": {"drift A-S v2": ["held-out code stalled"]},
  "loops": {
    "A-S": {"arc": "A", "arm": "S", "best_rollout": "shared-r1-t000", "best_steps": 10, "best_val_bpb": 0.99,
            "history": [{"ast_diversity": 0.5, "best_val_bpb": 0.99, "mean_val_bpb": 1.02, "round": 1,
                         "success_rate": 1.0}],
            "kind": "gold", "reason": "", "round": 1, "start_val_bpb": 1.0, "status": "running", "strikes": 0,
            "version": 1},
    "FLOOR": {"arc": "A", "arm": "FLOOR", "best_rollout": "", "best_steps": 0, "best_val_bpb": NaN,
              "history": [], "kind": "floor", "reason": "", "round": 0, "start_val_bpb": 1.0,
              "status": "running", "strikes": 0, "version": 0}
  },
  "noise": {"k": 2, "mean": 1.0, "std": 0.01}
}
"""


def test_a_state_json_of_the_dict_layout_still_loads(tmp_path):
    run = RunDir(tmp_path)
    run.state.write_text(OLD)
    st = ExperimentState.from_json(run.read_state(), "ignored: the file names its experiment")
    assert (st.experiment, st.noise, st.elapsed_before_s) == ("matrix", Noise(1.0, 0.01, 2), 12.5)
    assert st.alarms == {"drift A-S v2": ["held-out code stalled"]}
    a = st.loops["A-S"]
    assert (a.kind, a.arc, a.arm, a.round, a.version, a.best_rollout, a.best_steps) == ("gold", "A", "S", 1, 1, "shared-r1-t000", 10)
    assert a.history == [RoundStats(1, 0.99, 1.02, 1.0, 0.5)]
    assert math.isnan(st.loops["FLOOR"].best_val_bpb)


def test_written_as_it_was_read_but_for_the_time_spent(tmp_path):
    run = RunDir(tmp_path)
    run.state.write_text(OLD)
    st = ExperimentState.from_json(run.read_state(), "matrix")
    run.write_state(st.to_json())
    old, new = json.loads(OLD), run.read_state()
    assert new["elapsed_s"] >= old["elapsed_s"]  # a resumed run adds its own time
    for d in (old, new):
        d.pop("elapsed_s"), d.pop("elapsed_before_s", None)
    assert json.dumps(new, sort_keys=True) == json.dumps(old, sort_keys=True)


def test_a_new_run_starts_empty_and_uncalibrated():
    st = ExperimentState.from_json({}, "matrix")
    assert (st.experiment, st.loops, st.noise, st.alarms) == ("matrix", {}, None, {})
    assert "noise" not in st.to_json()  # the report tells an uncalibrated run by the missing key


def test_a_fresh_loop_starts_from_the_seed():
    st = LoopState.fresh(LoopSpec("B-F", "gold", "B", "F"), 1.25)
    assert (st.kind, st.arc, st.arm, st.start_val_bpb, st.round, st.status) == ("gold", "B", "F", 1.25, 0, "running")
    assert math.isnan(st.best_val_bpb) and st.history == []
