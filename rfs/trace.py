"""The trace row: one per rollout, the schema every later stage reads.

A row is written once, atomically, and never edited. `status` tells the truth (DESIGN.md):
`success` only when the run exited 0 and the trusted evaluator produced a finite val_bpb.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # 2: `arm` became `loop`, `version` an integer (upgrade() reads version 1)

# The vocabulary, defined once. A *line* is one condition of the experiment: a gold line per
# (arc, arm), named "A-S", "B-F" …, and the baselines on the frozen V0. A *loop* is one independent
# run of rounds of a line: its replicate 0 is named like the line, replicate k > 0 "<line>.<k>". An
# *arm* is S (stamped) or F (filtered) only; an *arc* is A (every round from the pristine train.py)
# or B (from the best so far). A *version* is the researcher's weights, V0, V1 … as an integer.
CTRL = "CTRL"  # frozen V0, experience in context
FLOOR = "FLOOR"  # frozen V0, no memory
SHARED = "shared"  # the loop of round 1, collected once with V0 for every loop that starts from it
PROBE = "probe"  # the loop of the zero-shot probe rollouts (written under probes/, never a curve)

STATUSES = (
    "success",
    "syntax_error",
    "crash",
    "timeout",
    "no_edit",
    "agent_error",  # the researcher never produced a usable action
    "infra_error",  # slot, ssh or server failure: not the researcher's fault, never trained on
    "harness_violation",
    "context_overflow",  # the researcher's chat outgrew the served context window before any run
)

MESSAGE = pa.struct(
    [
        ("role", pa.string()),  # system | user | assistant | tool
        ("content", pa.string()),  # for assistant turns: the action as JSON, without the thought
        ("reasoning", pa.string()),  # the free-text thought, kept apart so consolidation can mask it
    ]
)

SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        # identity
        ("experiment", pa.string()),
        ("loop", pa.string()),  # "A-S", "A-S.1" … | CTRL | FLOOR | SHARED (round 1) | PROBE
        ("line", pa.string()),  # the loop's line: "A-S" for "A-S.1"
        ("replicate", pa.int32()),  # which independent loop of its line, 0 … K-1
        ("arc", pa.string()),  # A | B
        ("round", pa.int32()),
        ("version", pa.int32()),  # the researcher's version: 0 for V0
        ("thread", pa.int32()),
        ("seed_control", pa.bool_()),  # the unmodified starting train.py, run beside the wave to measure its noise
        ("rollout_id", pa.string()),
        ("seed", pa.int64()),
        # placement
        ("host", pa.string()),
        ("slot", pa.string()),
        ("gpu_type", pa.string()),
        ("job_id", pa.string()),
        # provenance
        ("env", pa.string()),
        ("program_md_sha256", pa.string()),
        ("seed_train_py_sha256", pa.string()),
        ("start_train_py_sha256", pa.string()),  # arc B starts from the best so far, not the seed
        ("start_val_bpb", pa.float64()),  # the starting train.py's val_bpb (NaN if unknown)
        ("researcher_model", pa.string()),
        ("researcher_weights_sha256", pa.string()),
        # the conversation
        ("action_space", pa.string()),  # code | hparams
        ("response_schema", pa.string()),  # the JSON schema requested, as JSON text
        ("schema_enforced", pa.bool_()),  # the server enforced it by constrained decoding
        ("conditioning_stamp", pa.string()),  # arm S pre-fill; "" when unconditioned
        ("memory", pa.string()),  # CTRL's in-context memory; "" otherwise
        ("messages", pa.list_(MESSAGE)),
        # the code
        ("final_train_py", pa.string()),
        ("diff", pa.string()),  # unified diff vs the starting train.py
        # the run
        ("exit_code", pa.int32()),
        ("status", pa.string()),
        ("detail", pa.string()),  # one line: why this status
        ("val_bpb", pa.float64()),
        ("steps", pa.int64()),
        ("tokens", pa.int64()),
        ("peak_vram_mb", pa.float64()),
        ("training_seconds", pa.float64()),
        ("wall_seconds", pa.float64()),
        ("stdout_tail", pa.string()),
        ("blob_path", pa.string()),  # relative to the run directory
        # accounting
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("turns", pa.int32()),
        ("tool_calls", pa.int32()),
        ("valid_actions", pa.int32()),
        ("invalid_actions", pa.int32()),
        ("edit_attempts", pa.int32()),
        ("infra_attempts", pa.int32()),
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
        ("anomaly_flags", pa.list_(pa.string())),
    ],
    metadata={"rfs_schema_version": str(SCHEMA_VERSION)},
)

_NULLABLE = {"exit_code", "job_id"}


def validate(row: dict[str, Any]) -> None:
    """Raise ValueError naming the first problem; a row that passes converts losslessly (to_table).

    Checked in Python, by checkers built from SCHEMA once (_CHECKS), rather than by converting:
    a wave validates every row as it finishes, and a one-row pyarrow conversion costs far more.
    """
    missing, extra = _NAMES - row.keys(), row.keys() - _NAMES
    if missing or extra:
        raise ValueError(f"trace row: missing {sorted(missing)}, unknown {sorted(extra)}")
    if row["status"] not in STATUSES:
        raise ValueError(f"trace row: status {row['status']!r} is not one of {STATUSES}")
    finite = isinstance(row["val_bpb"], float) and math.isfinite(row["val_bpb"])
    if (row["status"] == "success") != finite:
        raise ValueError(f"trace row: status {row['status']} with val_bpb {row['val_bpb']!r}")
    for name, nullable, check in _CHECKS:
        value = row[name]
        if value is None:
            if nullable:
                continue
            raise ValueError(f"trace row: {name} is None")
        if problem := check(value):
            raise ValueError(f"trace row: {name}: {problem}")


Check = Callable[[Any], str]  # '' when pyarrow stores the value as its column's type exactly, else what is wrong


def _checker(typ: pa.DataType) -> Check:
    if pa.types.is_string(typ):
        return _string
    if pa.types.is_boolean(typ):
        return lambda v: "" if isinstance(v, bool) else f"expected a bool, got {type(v).__name__}"
    if typ in (pa.int32(), pa.int64()):
        return functools.partial(_int, typ.bit_width)
    if pa.types.is_float64(typ):
        return _float
    if pa.types.is_list(typ):
        return functools.partial(_list, _checker(typ.value_type))
    if pa.types.is_struct(typ):
        return functools.partial(_struct, {f.name: _checker(f.type) for f in typ})
    raise TypeError(f"trace.validate has no check for {typ}")  # a new column type needs its check here


def _string(value: Any) -> str:
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: Parquet holds UTF-8 only
        return f"not valid UTF-8 ({exc.reason} at {exc.start})"
    return ""


def _int(bits: int, value: Any) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an int, got {type(value).__name__}"
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        return f"{value} does not fit int{bits}"
    return ""


def _float(value: Any) -> str:
    if not isinstance(value, (float, int)) or isinstance(value, bool):
        return f"expected a float, got {type(value).__name__}"
    return ""


def _list(item: Check, value: Any) -> str:
    if not isinstance(value, list):
        return f"expected a list, got {type(value).__name__}"
    for i, v in enumerate(value):
        if v is None:
            return f"[{i}] is None"
        if problem := item(v):
            return f"[{i}]: {problem}"
    return ""


def _struct(fields: dict[str, Check], value: Any) -> str:
    if not isinstance(value, dict) or value.keys() != fields.keys():
        return f"expected an object with keys {sorted(fields)}"
    for name, check in fields.items():
        if value[name] is None:
            return f"{name} is None"
        if problem := check(value[name]):
            return f"{name}: {problem}"
    return ""


_NAMES = frozenset(SCHEMA.names)
_CHECKS = tuple((f.name, f.name in _NULLABLE, _checker(f.type)) for f in SCHEMA)


# What a column holds when the row's builder has nothing for it: a rollout that never ran (an
# infra_error row) leaves most of the run's columns here.
_EMPTY = {pa.string(): "", pa.int32(): 0, pa.int64(): 0, pa.float64(): 0.0, pa.bool_(): False}


def _empty(field: pa.Field) -> Any:
    if field.name in _NULLABLE:
        return None
    if field.name == "val_bpb":
        return math.nan
    return [] if pa.types.is_list(field.type) else _EMPTY[field.type]


_DEFAULTS = {f.name: _empty(f) for f in SCHEMA}


def new_row(**columns: Any) -> dict[str, Any]:
    """The one builder of a trace row: every column, the ones not given at their empty value.

    An unknown column is a bug in the caller and raises at once; the row is validated where it is
    written (rfs.collect.wave), once."""
    unknown = columns.keys() - _NAMES
    if unknown:
        raise ValueError(f"trace row: unknown columns {sorted(unknown)}")
    row = {**_DEFAULTS, **columns, "schema_version": SCHEMA_VERSION}
    row["line"] = row["line"] or row["loop"]  # a loop that is its line's only replicate
    return row


def to_table(rows: list[dict[str, Any]], *, validated: bool = False) -> pa.Table:
    """Rows as a table of SCHEMA; `validated` skips the check for rows validate() passed already."""
    if not validated:
        for row in rows:
            validate(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def upgrade(table: pa.Table, schema: pa.Schema = SCHEMA) -> pa.Table:
    """A table an older rfs wrote (trace or metrics) as `schema`, by default the current trace SCHEMA.

    Before schema version 2 the loop's column was named `arm` and versions were text ("v3")."""
    if "arm" in table.column_names and "loop" in schema.names:
        table = table.rename_columns(["loop" if n == "arm" else n for n in table.column_names])
    if "line" in schema.names and "line" not in table.column_names:  # one loop per line before replicates
        table = table.append_column("line", table["loop"])
    for name, value in (("replicate", 0), ("seed_control", False)):
        if name in schema.names and name not in table.column_names:
            table = table.append_column(name, pa.array([value] * len(table), schema.field(name).type))
    if "version" in schema.names and pa.types.is_string(table.schema.field("version").type):
        numbers = [int(v.removeprefix("v")) for v in table["version"].to_pylist()]
        table = table.set_column(table.schema.get_field_index("version"), "version", pa.array(numbers, pa.int32()))
    return table.select(schema.names).cast(schema)


def read(path: Any, columns: list[str] | None = None) -> pa.Table:
    """A compacted round file (traces/<loop>/round-<n>.parquet) as the current SCHEMA."""
    table = upgrade(pq.read_table(path))
    return table.select(columns) if columns else table


def read_rows(path: Any) -> list[dict[str, Any]]:
    return read(path).to_pylist()


def dumps(row: dict[str, Any]) -> bytes:
    """A row as one JSON document, as a wave writes each finished rollout (RunDir.pending_row):
    far cheaper than a one-row Parquet file (docs/LOG.md), and loads() gives back the very same
    values."""
    return json.dumps(row, allow_nan=True).encode()


def loads(data: bytes) -> dict[str, Any]:
    """A row dumps() wrote, as the current SCHEMA (a wave of an older rfs resumed by this one)."""
    row = json.loads(data)
    if row["schema_version"] == 1:  # upgrade() below, for one row
        row["loop"], row["version"] = row.pop("arm"), int(row["version"].removeprefix("v"))
        row.update(line=row["loop"], replicate=0, seed_control=False, schema_version=SCHEMA_VERSION)
    return row


def text_sha256(text: str) -> str:
    """The provenance hash of a text (program.md, a train.py) as trace rows record it."""
    return hashlib.sha256(text.encode()).hexdigest()


def outcome_stamp(status: str, val_bpb: float, steps: int, flags: Sequence[str] = ()) -> str:
    """The stamp consolidation prepends to a reply and arm S pre-fills to condition on an outcome.

    One function for both so training and conditioning put exactly the same text in the same place.
    A run the harness flagged (anomaly_flags) says so in its stamp: its number is never rewarded as
    if it were clean.
    """
    bpb = f"{val_bpb:.3f}" if status == "success" and math.isfinite(val_bpb) else "nan"
    flagged = f" flags={','.join(flags)}" if flags else ""
    return f"<val_bpb={bpb} status={status} steps={int(steps)}{flagged}>"
