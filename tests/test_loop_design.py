"""The experiment's design, without a model: replicates and their names, paired seeds, the lines
matched to each arc, the placebo's permuted stamps, CTRL's memory in tokens, and seed controls
that nothing trains on."""

from __future__ import annotations

import math

from rfs import config
from rfs.consolidate import dataset
from rfs.loop.memory import HEADER, budget_tokens, build_memory, chars_bound, choose, context_window
from rfs.loop.plan import lines, plan, rollout_seed
from rfs.trace import new_row


def cfg(**experiment) -> config.Config:
    return config.load(None, {"experiment": {"arcs": ["A", "B"], "arms": ["S", "F"], **experiment}})


def test_replicates_name_every_line_and_keep_their_line():
    loops = plan(cfg(replicates=3))
    names = [l.name for l in loops]
    per_line = len(lines(cfg()))
    assert len(loops) == 3 * per_line and len(set(names)) == len(names)
    assert names[:2] == ["A-S", "CTRL"] and names[per_line:per_line + 2] == ["A-S.1", "CTRL.1"]
    assert {(l.line_name, l.replicate) for l in loops if l.name == "CTRL.2"} == {("CTRL", 2)}
    assert {l.shared for l in loops} == {"shared", "shared.1", "shared.2"}


def test_each_arc_has_its_own_baselines_and_arm_s_its_controls():
    by = {l.name: l for l in lines(cfg())}
    assert {n: (by[n].kind, by[n].arc) for n in ("CTRL", "FLOOR", "CTRL-B", "FLOOR-B")} == {
        "CTRL": ("ctrl", "A"), "FLOOR": ("floor", "A"), "CTRL-B": ("ctrl", "B"), "FLOOR-B": ("floor", "B")}
    assert by["A-S-noprefill"].trains and not by["A-S-noprefill"].conditioned and by["A-S"].conditioned
    assert by["A-S-placebo"].conditioned and by["A-S-placebo"].variant == "placebo"
    assert "A-S-placebo" not in {l.name for l in lines(cfg(controls=["noprefill"]))}
    assert {l.name for l in lines(cfg(arcs=["A"]))}.isdisjoint({"CTRL-B", "FLOOR-B"})


def test_seeds_are_paired_across_lines_and_distinct_across_replicates_rounds_threads():
    seeds = {(k, r, t): rollout_seed(7, k, r, t) for k in range(3) for r in range(1, 4) for t in range(48)}
    assert len(set(seeds.values())) == len(seeds)
    # neighbouring rollouts never share a sampling stream (turn k samples with seed + k, k < 64)
    ordered = sorted(seeds.values())
    assert min(b - a for a, b in zip(ordered, ordered[1:])) >= 64
    assert rollout_seed(7, 1, 2, 3) != rollout_seed(8, 1, 2, 3)


def row(i: int, status: str, bpb: float = math.nan, *, control: bool = False, diff_lines: int = 1) -> dict:
    diff = "".join(f"+x{i}_{j} = {j}\n" for j in range(diff_lines))
    return new_row(loop="CTRL", rollout_id=f"CTRL-r1-t{i:03d}", round=1, thread=i, status=status,
                   val_bpb=bpb if status == "success" else math.nan, steps=10, diff=diff, seed_control=control, start_val_bpb=math.nan,
                   messages=[{"role": "assistant", "content": "{}", "reasoning": ""}])  # even a control's: the flag decides


ROWS = ([row(i, "success", 1.0 + i / 100) for i in range(8)] + [row(8 + i, "crash") for i in range(16)]
        + [row(30, "infra_error"), row(31, "success", 0.5, control=True)])


def test_ctrl_memory_holds_what_arm_s_trains_on_when_it_fits():
    text = build_memory(ROWS, budget=10**6)
    trained = dataset.select(ROWS, "A-S", None)
    assert text.startswith(HEADER) and len(trained) == 24
    assert text.count("- round 1:") == len(trained)  # every usable trace, failures too
    assert all(f"+x{r['thread']}_0" in text for r in trained)
    assert "x31_0" not in text and "x30_0" not in text  # no seed control, no infra_error


def test_ctrl_memory_keeps_the_failure_share_within_its_token_budget():
    budget = 120
    chosen = choose(ROWS, budget, chars_bound)
    text = build_memory(ROWS, budget, chars_bound)
    assert 3 <= len(chosen) < 24 and chars_bound(text) <= budget
    fails = sum(r["status"] != "success" for r in chosen)
    assert abs(fails / len(chosen) - 16 / 24) <= 1 / len(chosen)  # the rounds' 2:1 failures, to one entry
    assert min(r["val_bpb"] for r in chosen if r["status"] == "success") == 1.0  # successes best first


def test_an_entry_too_long_to_fit_is_passed_over_not_cut():
    rows = [row(0, "success", 1.0, diff_lines=500), row(1, "success", 1.1), row(2, "crash")]
    text = build_memory(rows, 80, chars_bound)
    assert "x0_0" not in text and "x1_0" in text and "x2_0" in text


def test_the_memory_budget_is_half_the_window_left_after_the_fixed_prompt():
    embedded = config.load(None)
    assert context_window(embedded) == 8192
    assert budget_tokens(embedded, "a" * 3000, chars_bound) == (8192 - 1000) // 2
    capped = config.load(None, {"loop": {"ctrl_memory_tokens": 500}})
    assert budget_tokens(capped, "a" * 3000, chars_bound) == 500
    assert context_window(config.load(None, {"experiment": {"preset": "cluster"}})) == 32768


def test_the_placebo_trains_on_a_permutation_of_its_rounds_stamps():
    rows = [row(i, "success", 1.0 + i / 10) for i in range(6)] + [row(6, "crash"), row(7, "timeout")]
    truth = [dataset.stamp_of(r) for r in rows]
    permuted = dataset.permute_stamps(rows, seed=3)
    assert sorted(permuted) == sorted(truth) and permuted != truth
    assert dataset.permute_stamps(rows, seed=3) == permuted  # seeded: a resumed fit trains the same
    assert dataset.placebo("A-S-placebo.2") and not dataset.placebo("A-S")
    assert dataset.filtered("A-F.1") and not dataset.filtered("A-S-placebo")


def test_seed_controls_are_never_trained_on():
    assert all(not r["seed_control"] for r in dataset.select(ROWS, "A-S", None))
    assert all(not r["seed_control"] for r in dataset.select(ROWS, "A-F", {"mean": 2.0, "std": 0.01}))
    assert len(dataset.select(ROWS, "A-F", {"mean": 2.0, "std": 0.01})) == 8  # 0.5 of the control is not among them


def test_calibration_varies_the_training_seed_of_the_seed_file():
    from rfs import ROOT
    from rfs.envs.calibrate import with_seed

    seed = (ROOT / "env" / "builtin" / "train.py").read_text()
    runs = [with_seed(seed, i) for i in range(10)]
    assert len(set(runs)) == 10 and runs[0] == seed and "SEED = 1346  #" in runs[9]
    assert with_seed("x = 1\n", 5) == "x = 1\n"  # no SEED line (autoresearch): run as it is
    assert config.load(None).env.calibration_k >= 10
