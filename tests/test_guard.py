"""The collapse guard: each strike rule, NaN handling, and the pause after `patience` faulty rounds in a row."""

from __future__ import annotations

import math

from rfs.config import GuardCfg
from rfs.loop import guard
from rfs.loop.state import LoopState, RoundStats

CFG = GuardCfg(min_success_rate=0.1, min_ast_diversity=0.05, max_bpb_regression=0.1, patience=2)


def stats(r: int = 1, success: float = 0.5, diversity: float = 0.5, mean: float = 1.0) -> RoundStats:
    return RoundStats(r, best_val_bpb=mean - 0.05, mean_val_bpb=mean, success_rate=success, ast_diversity=diversity)


def fresh() -> LoopState:
    return LoopState("gold", "A", "S", start_val_bpb=1.0)


def test_a_healthy_round_has_no_strike():
    assert guard.strikes(stats(2), [stats(1)], CFG) == []


def test_each_rule_strikes_on_its_own():
    assert guard.strikes(stats(success=0.05), [], CFG) == ["success rate 0.05 < 0.1"]
    assert guard.strikes(stats(diversity=0.01), [], CFG) == ["AST diversity 0.010 < 0.05"]
    past = [stats(1, mean=1.0), stats(2, mean=1.3)]  # regression is measured from the best mean, 1.0
    assert guard.strikes(stats(3, mean=1.2), past, CFG) == [
        "mean val_bpb 1.2000 regressed past the best mean 1.0000 + 0.1"]
    assert guard.strikes(stats(3, mean=1.05), past, CFG) == []  # within the margin


def test_the_rules_add_up():
    problems = guard.strikes(stats(2, success=0.0, diversity=0.0, mean=2.0), [stats(1)], CFG)
    assert [p.split()[0] for p in problems] == ["success", "AST", "mean"]


def test_the_first_round_has_no_past_to_regress_from():
    assert guard.strikes(stats(1, mean=9.0), [], CFG) == []


def test_nan_is_no_evidence_either_way():
    # a round with no successful run has no mean, and an earlier such round is no best mean
    assert guard.strikes(stats(2, mean=math.nan), [stats(1, mean=1.0)], CFG) == []
    assert guard.strikes(stats(2, mean=5.0), [stats(1, mean=math.nan)], CFG) == []
    assert guard.strikes(stats(3, mean=1.2), [stats(1, mean=math.nan), stats(2, mean=1.0)], CFG) != []
    # a round of infrastructure failures only has no success rate: the researcher is not struck
    assert guard.strikes(stats(success=math.nan), [], CFG) == []


def test_a_loop_pauses_after_patience_faulty_rounds_in_a_row():
    st = fresh()
    assert guard.judge(st, stats(1, success=0.0), CFG) and (st.strikes, st.status) == (1, "running")
    assert guard.judge(st, stats(2, success=0.0), CFG) and (st.strikes, st.status) == (2, "paused")
    assert st.reason == "collapse guard: success rate 0.00 < 0.1"
    assert [h.round for h in st.history] == [1, 2]


def test_a_clean_round_resets_the_strikes():
    st = fresh()
    guard.judge(st, stats(1, success=0.0), CFG)
    assert guard.judge(st, stats(2), CFG) == [] and st.strikes == 0
    guard.judge(st, stats(3, success=0.0), CFG)
    assert (st.strikes, st.status) == (1, "running")  # not two in a row: no pause


def test_an_unguarded_loop_keeps_its_history_but_is_never_struck():
    st = fresh()
    for r in (1, 2, 3):
        assert guard.judge(st, stats(r, success=0.0), CFG, guarded=False) == []
    assert (st.strikes, st.status, len(st.history)) == (0, "running", 3)


def test_the_regression_rule_sees_the_history_before_this_round():
    st = fresh()
    guard.judge(st, stats(1, mean=1.0), CFG)
    assert guard.judge(st, stats(2, mean=1.5), CFG)  # judged against round 1, not against itself
