"""The proxy-drift alarm on constructed histories."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from rfs.evals import drift, metrics


def test_fires_when_training_improves_and_the_probe_regresses_or_stalls():
    msg = drift.drift([1.30, 1.25, 1.20, 1.10], [1.50, 1.52, 1.55, 1.56], window=3, probe_name="transfer")
    assert msg and "regressed" in msg and "V0..V3" in msg and "1.3000 -> 1.1000" in msg
    flat = drift.drift([1.30, 1.25, 1.20, 1.10], [1.50, 1.49, 1.51, 1.50], window=3)
    assert flat and "stalled" in flat


def test_quiet_when_the_probe_improves_too_or_training_does_not():
    assert drift.drift([1.3, 1.25, 1.2, 1.1], [1.5, 1.45, 1.4, 1.35], window=3) is None
    assert drift.drift([1.2, 1.2, 1.25, 1.2], [1.5, 1.5, 1.6, 1.7], window=3) is None


def test_only_the_last_window_counts():
    # Drift early on, then both improve over the last two versions: no alarm for window 2.
    train, probe = [1.4, 1.3, 1.2, 1.1], [1.5, 1.6, 1.5, 1.4]
    assert drift.drift(train, probe, window=2) is None
    assert drift.drift(train[:2], probe[:2], window=1) is not None


def test_higher_is_better_probes_and_thresholds():
    train = [1.3, 1.2, 1.1]
    assert drift.drift(train, [0.50, 0.50, 0.375], window=2, probe_higher_is_better=True) is not None
    assert drift.drift(train, [0.25, 0.50, 0.625], window=2, probe_higher_is_better=True) is None
    # A training gain within min_gain is noise, not improvement.
    assert drift.drift(train, [1.5, 1.5, 1.6], window=2, min_gain=0.25) is None
    # A probe gain up to `stall` still counts as stalled.
    assert drift.drift(train, [1.5, 1.5, 1.49], window=2, stall=0.02) is not None


def test_edge_cases_never_fire_or_fail_clearly():
    assert drift.drift([1.3, 1.1], [1.5, 1.6], window=3) is None  # too few versions
    assert drift.drift([1.3, 1.2, 1.1], [math.nan, 1.5, 1.6], window=2) is None  # missing probe at V0
    assert drift.drift([1.3, 1.2, math.nan], [1.5, 1.5, 1.6], window=2) is None
    with pytest.raises(ValueError, match="window"):
        drift.drift([1.0, 0.9], [1.0, 1.0], window=0)
    with pytest.raises(ValueError, match="3 training values but 2"):
        drift.drift([1.0, 0.9, 0.8], [1.0, 1.0], window=1)


def test_alarms_from_a_version_eval_table_with_a_shared_v0():
    def row(loop, arc, v, probe, vals):
        return metrics.version_eval_row("e", arc, loop, v, probe, vals)

    rows = [
        row("shared", "", 0, "zero_shot", [1.30, 1.35]),
        row("shared", "", 0, "transfer", [1.50]),
        row("shared", "", 0, "code", [1, 1, 0, 1]),
        row("A-S", "A", 1, "zero_shot", [1.20, math.nan]),
        row("A-S", "A", 1, "transfer", [1.52]),
        row("A-S", "A", 1, "code", [1, 1, 0, 0]),
        row("A-S", "A", 2, "zero_shot", [1.10]),  
        row("A-S", "A", 2, "transfer", [1.40]),
        row("A-S", "A", 2, "code", [1, 0, 0, 0]),
        row("B-S", "B", 2, "zero_shot", [0.90]),  # another loop: must not mix in
    ]
    table = pa.Table.from_pylist(rows, schema=metrics.VERSION_EVAL)
    got = drift.alarms(table, "A-S", window=2)
    assert len(got) == 1 and got[0].startswith("A-S:") and "code" in got[0] and "0.7500 -> 0.2500" in got[0]
    assert drift.alarms(table, "A-F", window=2) == []  # only V0 known for F
    assert drift.alarms(metrics.VERSION_EVAL.empty_table(), "A-S", window=2) == []


def test_the_window_counts_probed_versions_only():
    """With eval_every = 2 only V0, V2, V4, V6 are probed: a window of 3 spans V0..V6."""
    rows = []
    for v, (zs, code) in enumerate([(1.30, 1.0), (1.20, 1.0), (1.10, 0.5), (1.00, 0.25)]):
        loop = "shared" if v == 0 else "A-S"
        rows += [metrics.version_eval_row("e", "A", loop, 2 * v, "zero_shot", [zs]),
                 metrics.version_eval_row("e", "A", loop, 2 * v, "code", [code])]
    table = pa.Table.from_pylist(rows, schema=metrics.VERSION_EVAL)
    got = drift.alarms(table, "A-S", window=3)
    assert len(got) == 1 and "over V0..V6" in got[0] and "code regressed" in got[0]
