"""A streamed job's output (ssh, SLURM) is kept as head + tail, the rest counted."""

from __future__ import annotations

from rfs.launch.base import OUTPUT_HEAD, OUTPUT_TAIL, Kept


def test_a_flood_is_kept_as_head_and_tail_with_the_rest_counted():
    out = Kept()
    chunk = bytes(range(256)) * 256  # 64 KiB
    for i in range(80):  # 5 MiB, streamed as an ssh channel delivers it
        out += bytes([i % 256]) + chunk[1:]
    kept = bytes(out)
    total = 80 * len(chunk)
    assert out.dropped == total - OUTPUT_HEAD - OUTPUT_TAIL
    assert len(kept) < OUTPUT_HEAD + OUTPUT_TAIL + 100 and b"bytes of output not kept" in kept
    assert kept.startswith(bytes([0]) + chunk[1:]) and kept.endswith(bytes([79]) + chunk[1:])


def test_short_output_is_kept_whole():
    out = Kept()
    out += b"line 1\n"
    out.extend(b"line 2\n")
    assert bytes(out) == b"line 1\nline 2\n" and out.dropped == 0 and len(out) == 14
