"""trace.validate checks rows in Python against the schema: it must reject whatever pyarrow would
refuse or store inexactly, and a row it passes must survive Parquet and the wave's JSON files."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rfs import trace
from tests.test_collect_rows import msg, row

GOOD = row(start_val_bpb=2.5, exit_code=0, job_id="17", messages=[msg("user", "hi"), msg("assistant", "{}", "think")],
           anomaly_flags=["short_training"])

WRONG_TYPE = [
    ("experiment", 5), ("experiment", "lone \ud800 surrogate"), ("schema_version", 1.5), ("schema_version", True),
    ("round", "3"), ("thread", 2**31), ("seed", 2**63), ("start_val_bpb", "2.5"), ("peak_vram_mb", False),
    ("schema_enforced", 1), ("messages", "hi"), ("messages", [{"role": "user"}]), ("messages", [msg("user", 3)]),
    ("anomaly_flags", ["a", 3]), ("anomaly_flags", "short_training"), ("exit_code", "0"),
]
# Parquet would hold these nulls, but no reader expects one: only exit_code and job_id may be None.
NONE = [("status", None), ("messages", [None]), ("messages", [msg("user", "x", None)]),
        ("messages", [msg(None, "x")]), ("anomaly_flags", [None])]
WRONG = WRONG_TYPE + NONE


def test_a_valid_row_survives_parquet_and_json_unchanged():
    trace.validate(GOOD)
    assert trace.to_table([GOOD]).to_pylist() == [GOOD]
    assert trace.loads(trace.dumps(GOOD)) == GOOD


@pytest.mark.parametrize("name,value", WRONG, ids=[f"{n}={v!r}"[:40] for n, v in WRONG])
def test_a_wrong_value_is_named(name, value):
    with pytest.raises(ValueError, match=name):
        trace.validate({**GOOD, name: value})


def test_every_wrong_value_is_one_pyarrow_refuses_or_changes():
    """The rejections are not arbitrary: each value above fails the conversion or comes back
    different (a bool stored as an int, a float truncated), which is what 'lossless' rules out."""
    for name, value in WRONG_TYPE:
        bad = {**GOOD, name: value}
        try:
            back = pa.Table.from_pylist([bad], schema=trace.SCHEMA).to_pylist()[0][name]
        except (pa.ArrowException, ValueError, TypeError, UnicodeEncodeError, OverflowError):
            continue
        assert back != value or type(back) is not type(value), f"{name}={value!r} converts exactly"


def test_nullable_columns_take_none():
    trace.validate({**GOOD, "exit_code": None, "job_id": None})
