"""Hostile jobs against the local launcher itself: an output flood and an address-space hog. The
controller (this test process) must stay bounded in memory and every job must end."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import replace

import anyio
import pytest

from rfs.hosts import Slot, local_share_mb
from rfs.launch.base import OUTPUT_HEAD, OUTPUT_TAIL, Job
from rfs.launch.local import AS_SLACK_BYTES, LocalLauncher

SLOT = Slot("local-test", "local", "localhost", tuple(sorted(os.sched_getaffinity(0)))[:1], -1, sys.executable, ".")
FLOOD_MB = 200
# 200 MB of numbered lines, then one last line: the head and the tail must both come back.
FLOOD = (
    "import sys\nline = b'x' * 1023 + b'\\n'\nout = sys.stdout.buffer\nout.write(b'FIRST\\n')\n"
    f"for _ in range({FLOOD_MB} * 1024):\n    out.write(line)\nout.write(b'LAST\\n')\nout.flush()\n"
)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("stream", [False, True])
def test_a_200_mb_flood_is_kept_as_head_and_tail_and_the_controller_stays_bounded(stream):
    before = _maxrss_mb()
    lines = [0]

    def count(_line: str) -> None:
        lines[0] += 1

    job = Job("flood", (sys.executable, "-c", FLOOD), {}, 120)
    out = anyio.run(LocalLauncher().run, SLOT, job, count if stream else None)
    assert out.exit_code == 0 and not out.timed_out
    total = FLOOD_MB * (1 << 20) + len(b"FIRST\nLAST\n")
    assert out.output_dropped == total - OUTPUT_HEAD - OUTPUT_TAIL
    assert len(out.output) < OUTPUT_HEAD + OUTPUT_TAIL + 100
    assert out.output.startswith(b"FIRST\n") and out.output.endswith(b"LAST\n")
    assert f"{out.output_dropped} bytes of output not kept".encode() in out.output
    assert _maxrss_mb() - before < 64  # 200 MB went by; the controller kept about 1 MB of it
    if stream:
        assert lines[0] >= FLOOD_MB * 1024  # every line was still shown to the caller as it came


def test_a_cpu_slots_address_space_is_sized_from_its_memory():
    slot = replace(SLOT, memory_mb=512)
    script = "import os, resource as r; print(r.getrlimit(r.RLIMIT_AS)[1], os.environ['RFS_JOB_MEMORY_MB'])"
    out = anyio.run(LocalLauncher().run, slot, Job("as", (sys.executable, "-c", script), {}, 30))
    limit, told = out.output.split()
    assert int(limit) == (512 << 20) + AS_SLACK_BYTES and told == b"512"
    hog = "b = bytearray(8 << 30)\nprint('allocated')"  # beyond 512 MB + the slack: refused, not swapped
    out = anyio.run(LocalLauncher().run, slot, Job("hog", (sys.executable, "-c", hog), {}, 30))
    assert out.exit_code == 1 and b"MemoryError" in out.output and b"allocated" not in out.output


def test_local_slots_share_three_quarters_of_the_machine():
    total_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    assert local_share_mb(1) == pytest.approx(total_mb * 0.75, abs=1)
    assert local_share_mb(4) == pytest.approx(total_mb * 0.75 / 4, abs=1)
