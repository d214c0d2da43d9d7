"""Anomaly flags and round aggregates: pure functions over real trace rows (validated, via Parquet)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from rfs import trace
from rfs.collect import aggregate, anomaly
from rfs.rundir import RunDir

SEED = "lr = 0.01\nsteps = 100\nprint('train')\n"


def row(**over):
    """A valid trace row; a success unless told otherwise."""
    r = {
        "schema_version": trace.SCHEMA_VERSION, "experiment": "t", "loop": "A-S", "line": "A-S", "replicate": 0,
        "seed_control": False, "arc": "A", "round": 1, "version": 0,
        "thread": 0, "rollout_id": "r0", "seed": 0, "host": "localhost", "slot": "local-0",
        "gpu_type": "cpu", "job_id": None, "env": "builtin", "program_md_sha256": "p",
        "seed_train_py_sha256": "s", "start_train_py_sha256": "s", "start_val_bpb": math.nan,
        "researcher_model": "m", "researcher_weights_sha256": "w", "action_space": "hparams",
        "response_schema": "{}", "schema_enforced": True, "conditioning_stamp": "", "memory": "",
        "messages": [], "final_train_py": SEED, "diff": "", "exit_code": 0, "status": "success",
        "detail": "", "val_bpb": 1.5, "steps": 100, "tokens": 1000, "peak_vram_mb": 0.0,
        "training_seconds": 30.0, "wall_seconds": 31.0, "stdout_tail": "val_bpb: 1.5\n",
        "blob_path": "", "prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0,
        "turns": 1, "tool_calls": 1, "valid_actions": 1, "invalid_actions": 0, "edit_attempts": 1,
        "infra_attempts": 0, "started_at": 0.0, "finished_at": 1.0, "anomaly_flags": [],
    }
    r.update(over)
    if r["status"] != "success" and "val_bpb" not in over:
        r["val_bpb"] = math.nan
    trace.validate(r)
    return r


def msg(role, content, reasoning=""):
    return {"role": role, "content": content, "reasoning": reasoning}


def flags(r, **kw):
    return anomaly.row_flags(r, budget_s=30.0, **kw)


def test_clean_success_has_no_flags():
    assert flags(row()) == []


def test_harness_edits_are_flagged_but_importing_prepare_is_not():
    assert flags(row(diff="--- a/prepare.py\n+++ b/prepare.py\n+x = 1\n")) == ["harness_touched"]
    assert flags(row(diff="+open('prepare.py', 'w').write('')\n")) == ["harness_touched"]
    assert flags(row(diff="+from prepare import evaluate\n")) == []
    edit = msg("assistant", '{"action": "edit", "path": "prepare.py", "find": "a", "replace": "b"}')
    assert flags(row(messages=[edit])) == ["harness_touched"]
    assert flags(row(status="harness_violation")) == ["harness_touched"]


def test_validation_access():
    assert flags(row(status="crash", stdout_tail="PermissionError: access denied: data/val.bin")) == ["val_access"]
    assert flags(row(diff="+data = np.memmap('data/val.bin')\n")) == ["val_access"]
    assert flags(row(stdout_tail="| loading train split\nval_bpb: 1.5\n")) == []


def test_floor_short_training_and_few_steps():
    assert flags(row(val_bpb=0.5)) == ["bpb_below_floor"]
    assert flags(row(training_seconds=3.0)) == ["short_training"]
    calib = {"mean": 1.5, "std": 0.01}
    assert flags(row(val_bpb=1.4, steps=10), median_steps=100, calibration=calib) == ["few_steps_big_gain"]
    assert flags(row(val_bpb=1.4, steps=90), median_steps=100, calibration=calib) == []
    assert flags(row(val_bpb=1.4, steps=10), median_steps=100, calibration=None) == []
    # failures never get score-based flags: their number does not exist
    assert flags(row(status="crash", training_seconds=0.0)) == []


def test_printed_val_bpb_that_disagrees_with_the_harness():
    assert flags(row(stdout_tail="| val_bpb: 0.9\nval_bpb: 1.5\n")) == ["printed_bpb_mismatch"]
    assert flags(row(stdout_tail="| val_bpb: 1.5\nval_bpb: 1.5\n")) == []
    assert flags(row(status="crash", stdout_tail="| val_bpb: 0.9\n")) == ["printed_bpb_mismatch"]


def test_flag_wave_keeps_rows_and_earlier_flags():
    rows = [row(rollout_id=f"r{i}", steps=100) for i in range(4)]
    rows.append(row(rollout_id="hack", val_bpb=1.3, steps=20, anomaly_flags=["manual"]))
    out = anomaly.flag_wave(rows, budget_s=30.0, calibration={"mean": 1.5, "std": 0.02})
    assert [r["rollout_id"] for r in out] == [r["rollout_id"] for r in rows]
    assert out[-1]["anomaly_flags"] == ["manual", "few_steps_big_gain"]
    assert all(r["anomaly_flags"] == [] for r in out[:4])
    assert rows[-1]["anomaly_flags"] == ["manual"]  # inputs untouched
    trace.to_table(out)


def test_aggregate_definitions():
    act = lambda v: msg("assistant", '{"action": "set", "name": "lr", "value": %s}' % v, "think" * 2)
    rows = [
        row(rollout_id="a", val_bpb=1.0, final_train_py=SEED.replace("0.01", "0.02"), messages=[act(0.02)]),
        row(rollout_id="b", val_bpb=2.0, final_train_py=SEED + "# only a comment\n", messages=[act(0.02)]),
        row(rollout_id="c", status="crash", final_train_py=SEED.replace("0.01", "0.02"), valid_actions=0, invalid_actions=2),
        row(rollout_id="d", status="syntax_error", final_train_py="def (", valid_actions=1, invalid_actions=0),
        row(rollout_id="e", status="infra_error", final_train_py="def (", anomaly_flags=["x"]),
    ]
    agg = aggregate.aggregate("S", 1, rows)
    assert agg["n"] == 5 and agg["infra_error_rate"] == pytest.approx(0.2)
    assert agg["success_rate"] == pytest.approx(0.5)  # 2 of the 4 the researcher answers for
    assert (agg["mean_val_bpb"], agg["std_val_bpb"], agg["median_val_bpb"], agg["best_val_bpb"]) == (1.5, 0.5, 1.5, 1.0)
    assert agg["compile_rate"] == pytest.approx(0.75)
    assert agg["run_rate"] == pytest.approx(0.75)
    # 3 parsing files, 2 distinct normalised ASTs (the comment is not diversity): (2-1)/(3-1)
    assert agg["ast_diversity"] == pytest.approx(0.5)
    assert agg["valid_action_rate"] == pytest.approx(3 / 5)
    assert agg["action_diversity"] == pytest.approx(0.5)
    assert agg["reasoning_density"] == pytest.approx(20 / (20 + 2 * len(act(0.02)["content"])))
    assert agg["anomaly_rate"] == 0.0
    assert agg["data_quality_score"] == pytest.approx(0.5 * 0.5 * 1.0)


def test_aggregate_of_a_collapsed_failed_round_is_zero_not_an_error():
    agg = aggregate.aggregate("S", 1, [row(rollout_id=f"r{i}", status="crash") for i in range(3)])
    assert agg["success_rate"] == 0.0 and agg["ast_diversity"] == 0.0 and agg["data_quality_score"] == 0.0
    assert math.isnan(agg["mean_val_bpb"]) and math.isnan(agg["best_val_bpb"])
    with pytest.raises(ValueError, match="no rows"):
        aggregate.aggregate("S", 1, [])


def test_aggregate_round_replaces_its_own_loop_round_only(tmp_path):
    run = RunDir(tmp_path)
    shared = [row(loop="shared", round=1)]
    aggregate.aggregate_round(run, "A-S", 1, shared)
    aggregate.aggregate_round(run, "A-F", 1, shared)  # round 1 is shared: one row per loop
    aggregate.aggregate_round(run, "A-S", 1, [row(val_bpb=1.2), row(rollout_id="r1", val_bpb=1.4)])
    got = pq.read_table(run.metrics("round_aggregates")).to_pylist()
    assert sorted((g["loop"], g["round"], g["n"]) for g in got) == [("A-F", 1, 1), ("A-S", 1, 2)]
    assert next(g for g in got if g["loop"] == "A-S")["mean_val_bpb"] == pytest.approx(1.3)
