"""The embedded default and the study load, round-trip, and are what the README says they are."""

from __future__ import annotations

from rfs import config


def test_embedded_and_study_load_and_round_trip(tmp_path):
    for name in ("embedded", "study", "cluster"):
        cfg = config.load(config.ROOT / "experiments" / f"{name}.toml")
        (tmp_path / f"{name}.toml").write_text(config.to_toml(cfg))
        assert config.load(tmp_path / f"{name}.toml") == cfg


def test_the_default_is_the_quick_look_and_the_study_is_powered():
    default = config.load(config.default_experiment())
    study = config.load(config.ROOT / "experiments" / "study.toml")
    costs = lambda c: (c.experiment.max_rounds, c.env.budget_s, c.env.calibration_k, c.collect.rollouts,  # noqa: E731
                       c.experiment.replicates)
    assert all(q <= s for q, s in zip(costs(default), costs(study))) and costs(default) != costs(study)
    assert (default.experiment.arms, default.experiment.baselines) == (("S",), ("CTRL", "FLOOR"))
    assert "placebo" in default.experiment.controls and default.experiment.replicates == 1
    assert study.experiment.replicates >= 3 and study.loop.eval_every > 0
