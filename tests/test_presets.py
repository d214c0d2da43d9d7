"""The quick and study experiment files load, round-trip, and are what the README says they are."""

from __future__ import annotations

from rfs import config


def test_quick_and_study_load_and_round_trip(tmp_path):
    for name in ("quick", "study"):
        cfg = config.load(config.ROOT / "experiments" / f"{name}.toml")
        (tmp_path / f"{name}.toml").write_text(config.to_toml(cfg))
        assert config.load(tmp_path / f"{name}.toml") == cfg


def test_quick_is_smaller_than_the_embedded_default_in_every_cost():
    quick = config.load(config.ROOT / "experiments" / "quick.toml")
    default = config.load(config.ROOT / "experiments" / "embedded.toml")
    costs = lambda c: (c.experiment.max_rounds, c.env.budget_s, c.env.calibration_k, c.collect.rollouts,  # noqa: E731
                       c.loop.floor_waves, c.eval.zero_shot_rollouts)
    assert all(q <= d for q, d in zip(costs(quick), costs(default))) and costs(quick) != costs(default)
    assert (quick.experiment.arms, quick.experiment.baselines) == (("S",), ("CTRL", "FLOOR"))
