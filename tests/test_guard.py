"""The collapse guard: each strike rule, NaN handling, the noise-aware regression threshold, and the
pause after `patience` faulty rounds in a row."""

from __future__ import annotations

import math

import pytest

from rfs import config
from rfs.config import GuardCfg
from rfs.loop import guard
from rfs.loop.state import LoopState, RoundStats

CFG = GuardCfg(min_success_rate=0.1, min_ast_diversity=0.05, regression_z=3.0, patience=2)
SIGMA = 0.05  # the calibrated std: with n = 4 on both sides a regression must exceed 3·0.05·√(1/4+1/4) = 0.106


def stats(r: int = 1, success: float = 0.5, diversity: float = 0.5, mean: float = 1.0, n: int = 4,
          control_std: float = math.nan, control_n: int = 0, spread: float = math.nan) -> RoundStats:
    return RoundStats(r, best_val_bpb=mean - 0.05, mean_val_bpb=mean, success_rate=success, ast_diversity=diversity,
                      n=n, control_n=control_n, control_std_val_bpb=control_std, std_val_bpb=spread)


def fresh() -> LoopState:
    return LoopState("gold", "A", "S", start_val_bpb=1.0)


def test_a_healthy_round_has_no_strike():
    assert guard.strikes(stats(2), [stats(1)], CFG, SIGMA) == []


def test_each_rule_strikes_on_its_own():
    assert guard.strikes(stats(success=0.05), [], CFG, SIGMA) == ["success rate 0.05 < 0.1"]
    assert guard.strikes(stats(diversity=0.01), [], CFG, SIGMA) == ["AST diversity 0.010 < 0.05"]
    past = [stats(1, mean=1.0), stats(2, mean=1.3)]  # regression is measured from the best mean, 1.0
    assert guard.strikes(stats(3, mean=1.2), past, CFG, SIGMA) == [
        "mean val_bpb 1.2000 (n=4) regressed past the best mean 1.0000 (n=4) + 0.1061 (z=3.0 of the noise)"]
    assert guard.strikes(stats(3, mean=1.1), past, CFG, SIGMA) == []  # within what noise explains at n = 4


def test_the_rules_add_up():
    problems = guard.strikes(stats(2, success=0.0, diversity=0.0, mean=2.0), [stats(1)], CFG, SIGMA)
    assert [p.split()[0] for p in problems] == ["success", "AST", "mean"]


def test_the_first_round_has_no_past_to_regress_from():
    assert guard.strikes(stats(1, mean=9.0), [], CFG, SIGMA) == []


def test_nan_is_no_evidence_either_way():
    # a round with no successful run has no mean, and an earlier such round is no best mean
    assert guard.strikes(stats(2, mean=math.nan), [stats(1, mean=1.0)], CFG, SIGMA) == []
    assert guard.strikes(stats(2, mean=5.0), [stats(1, mean=math.nan)], CFG, SIGMA) == []
    assert guard.strikes(stats(3, mean=1.2), [stats(1, mean=math.nan), stats(2, mean=1.0)], CFG, SIGMA) != []
    # a round of infrastructure failures only has no success rate: the researcher is not struck
    assert guard.strikes(stats(success=math.nan), [], CFG, SIGMA) == []


def test_a_loop_pauses_after_patience_faulty_rounds_in_a_row():
    st = fresh()
    assert guard.judge(st, stats(1, success=0.0), CFG, SIGMA) and (st.strikes, st.status) == (1, "running")
    assert guard.judge(st, stats(2, success=0.0), CFG, SIGMA) and (st.strikes, st.status) == (2, "paused")
    assert st.reason == "collapse guard: success rate 0.00 < 0.1"
    assert [h.round for h in st.history] == [1, 2]


def test_a_clean_round_resets_the_strikes():
    st = fresh()
    guard.judge(st, stats(1, success=0.0), CFG, SIGMA)
    assert guard.judge(st, stats(2), CFG, SIGMA) == [] and st.strikes == 0
    guard.judge(st, stats(3, success=0.0), CFG, SIGMA)
    assert (st.strikes, st.status) == (1, "running")  # not two in a row: no pause


def test_an_unguarded_loop_keeps_its_history_but_is_never_struck():
    st = fresh()
    for r in (1, 2, 3):
        assert guard.judge(st, stats(r, success=0.0), CFG, SIGMA, guarded=False) == []
    assert (st.strikes, st.status, len(st.history)) == (0, "running", 3)


def test_the_regression_rule_sees_the_history_before_this_round():
    st = fresh()
    guard.judge(st, stats(1, mean=1.0), CFG, SIGMA)
    assert guard.judge(st, stats(2, mean=1.5), CFG, SIGMA)  # judged against round 1, not against itself


def test_the_regression_threshold_is_the_noise_of_the_two_means():
    past = [stats(1, mean=1.0, n=100)]
    assert guard.strikes(stats(2, mean=1.05, n=100), past, CFG, SIGMA)  # 3·0.05·√(2/100) = 0.021 < 0.05
    assert not guard.strikes(stats(2, mean=1.05, n=1), past, CFG, SIGMA)  # one success: 3·0.05·√1.01 = 0.151


def test_the_waves_seed_controls_set_the_noise_when_there_are_two():
    past = [stats(1, mean=1.0)]
    assert not guard.strikes(stats(2, mean=1.2, control_std=0.2, control_n=2), past, CFG, SIGMA)  # limit 0.42
    assert guard.strikes(stats(2, mean=1.2, control_std=0.2, control_n=1), past, CFG, SIGMA)  # one control: calibration


def test_the_researchers_own_spread_widens_the_threshold_beyond_the_seeds():
    """The embedded run's rounds of 3 scattered 3.55 to 4.5: a mean 0.26 worse is within that scatter."""
    past = [stats(1, mean=3.75, n=3, spread=0.30)]
    assert not guard.strikes(stats(2, mean=4.02, n=3, spread=0.40), past, CFG, 0.012)  # 3·√(.16/3+.09/3) = 0.87
    assert guard.strikes(stats(2, mean=4.02, n=3), [stats(1, mean=3.75, n=3)], CFG, 0.012)  # seed noise alone: 0.03


def test_one_noisy_round_never_pauses():
    with pytest.raises(config.ConfigError, match="guard.patience"):
        config.load(None, {"guard": {"patience": 1}})
