"""The rfs import graph has no cycle, and a function imports an rfs module only when that module
pulls in an optional heavy dependency (tools/imports.py says the rule and prints the graph)."""

from __future__ import annotations

import sys

from rfs import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import imports  # noqa: E402

def test_no_cycle_and_no_needless_lazy_import():
    graph, cycle, lazy = imports.analyse()
    assert not cycle, " -> ".join(cycle)
    assert not lazy, "\n".join(lazy)
