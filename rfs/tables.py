"""The metrics tables (metrics/<name>.parquet, docs/metrics.md): read against a schema, upserted by key.

One way for every table: rows whose key matches an incoming row are replaced and the whole file is
rewritten atomically, so a rerun of a round or a probe replaces its rows rather than adding them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rfs import atomic, trace

def read(path: Path, schema: pa.Schema) -> pa.Table:
    """The table at `path` as `schema`, or an empty one when the file does not exist yet."""
    if not Path(path).exists():
        return schema.empty_table()
    return trace.upgrade(pq.read_table(path), schema)  # a run of an older rfs, too


def upsert(path: Path, schema: pa.Schema, key: Sequence[str], rows: list[dict[str, Any]]) -> pa.Table:
    """Add `rows`, replacing existing rows with the same key, and rewrite the file atomically."""
    new = pa.Table.from_pylist(rows, schema=schema)  # a wrong type or missing column fails here
    keys = {tuple(r[k] for k in key) for r in rows}
    old = [r for r in read(path, schema).to_pylist() if tuple(r[k] for k in key) not in keys]
    table = pa.concat_tables([pa.Table.from_pylist(old, schema=schema), new])
    atomic.write_parquet(path, table)
    return table
