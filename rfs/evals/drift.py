"""The proxy-drift alarm: the training metric keeps improving while a held-out probe does not.

This is the failure mode A-Evolve-Training reports at 30B scale: the loop optimises its proxy
(val_bpb on the one task) and the researcher gets no better, or worse, at anything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

from rfs.trace import SHARED

HELD_OUT = {"transfer": False, "code": True}  # probe -> higher is better


def drift(
    train: Sequence[float],
    probe: Sequence[float],
    window: int,
    probe_name: str = "probe",
    probe_higher_is_better: bool = False,
    min_gain: float = 0.0,
    stall: float = 0.0,
    versions: Sequence[int] | None = None,
) -> str | None:
    """A message when, over the last `window` versions, the training metric improved and the probe did not.

    `train` and `probe` are per-version series (index = version), the training metric lower-is-better
    (best val_bpb). "Improved" means a net gain above `min_gain` from version -window-1 to the last;
    the probe "stalled" when its net gain over the same versions is at most `stall`. Too few versions,
    or a missing value (NaN) at either end of the window, cannot be judged and never fires.
    `versions` labels the entries (default: their index) when only some versions were probed.
    """
    if window < 1:
        raise ValueError(f"drift window {window}: expected at least 1")
    if len(train) != len(probe):
        raise ValueError(f"drift: {len(train)} training values but {len(probe)} {probe_name} values")
    if len(train) < window + 1:
        return None
    t0, t1, p0, p1 = train[-window - 1], train[-1], probe[-window - 1], probe[-1]
    if not all(math.isfinite(x) for x in (t0, t1, p0, p1)):
        return None
    train_gain = t0 - t1
    probe_gain = (p1 - p0) if probe_higher_is_better else (p0 - p1)
    if train_gain <= min_gain or probe_gain > stall:
        return None
    labels = list(versions) if versions is not None else list(range(len(train)))
    verb = "regressed" if probe_gain < 0 else "stalled"
    return (
        f"proxy drift: over V{labels[-window - 1]}..V{labels[-1]} the training metric improved "
        f"{t0:.4f} -> {t1:.4f} while held-out {probe_name} {verb} {p0:.4f} -> {p1:.4f}"
    )


def alarms(version_eval: pa.Table, loop: str, window: int) -> list[str]:
    """Drift messages for one gold loop ("A-S") from the version_eval table (metrics.VERSION_EVAL).

    The window counts probed versions (V0, V2, V4 … with eval_every = 2), not all versions.

    The training series is the zero-shot best val_bpb per version; the held-out series are the
    transfer best val_bpb and the code-probe pass rate. V0, shared by every loop and arc, may be
    recorded once under the loop SHARED.
    """
    series: dict[str, dict[int, float]] = {}
    for r in version_eval.to_pylist():
        if not (r["loop"] == loop or (r["loop"] == SHARED and r["version"] == 0)):
            continue
        series.setdefault(r["probe"], {})[r["version"]] = r["mean"] if r["probe"] == "code" else r["best"]
    train = series.get("zero_shot", {})
    if not train:
        return []
    versions = sorted(train)  # the probed versions only (every eval_every-th): a window spans probes
    out = []
    for probe, higher in HELD_OUT.items():
        held = series.get(probe, {})
        msg = drift(
            [train.get(v, math.nan) for v in versions],
            [held.get(v, math.nan) for v in versions],
            window,
            probe_name=probe,
            probe_higher_is_better=higher,
            versions=versions,
        )
        if msg:
            out.append(f"{loop}: {msg}")
    return out
