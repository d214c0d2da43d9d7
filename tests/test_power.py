"""`rfs plan`: the power calculation's figures and the command on the presets."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from rfs import ROOT, config
from rfs.evals import power, stats


def test_required_k_reaches_the_target_power_and_one_fewer_does_not():
    var = power.Variance(within=0.005, between=0.001, success=0.6, wall_s=100.0, source="test")
    k = power.required_k(var, 0.05, n=4, rounds=3)
    se = lambda k: stats.se_of_delta(0.005, 0.001, 4 * 2, k)  # noqa: E731  rounds ≥ 2 pooled: 2 rounds
    assert k is not None and stats.power(0.05, se(k), k - 1) >= 0.8 > stats.power(0.05, se(k - 1), k - 2)


def test_hours_count_every_line_replicate_round_and_rollout_over_the_slots():
    cfg = config.load(config.default_experiment(), {"experiment": {"controls": []}})  # A-S, CTRL, FLOOR
    var = power.Variance(0.01, 0.0, 0.6, 3600.0, "test")
    assert power.lines_per_replicate(cfg) == 3
    assert power.hours(cfg, var, n=4, rounds=3, k=2, slots=4) == pytest.approx(2 * 3 * 3 * 4 / 4)


def test_measured_variance_comes_from_the_traces():
    rows = [dict(loop=l, round=2, seed_control=False, status="success", start_val_bpb=1.0, val_bpb=v,
                 started_at=0.0, finished_at=50.0) for l, vs in (("A", (0.9, 0.8)), ("B", (0.5, 0.6))) for v in vs]
    var = power.measured(rows, "mean_improvement", math.nan, power.assumed(config.load(), 0.01))
    assert var.within == pytest.approx(0.005) and var.between == pytest.approx(0.3**2 / 2 - 0.005 / 2)  # means 0.15, 0.45
    assert var.wall_s == 50.0 and var.success == 1.0 and var.source.startswith("measured on 4 rollouts")


@pytest.mark.parametrize("preset", ["embedded", "cluster"])
def test_plan_command_prints_the_design_for_each_preset(preset):
    out = subprocess.run([sys.executable, "rfs.py", "plan", f"experiments/{preset}.toml", "--sigma", "0.012",
                          "--slots", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "replicates needed" in out.stdout and "primary metric: mean_improvement" in out.stdout
