import dataclasses

import pytest

from rfs import config, hosts
from rfs.config import ConfigError


def write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_is_the_embedded_preset():
    cfg = config.load()
    assert cfg.experiment.preset == "embedded"
    assert cfg.env.name == "builtin" and cfg.researcher.backend == "llamacpp"
    assert cfg.collect.rollouts == 4
    assert cfg.consolidate.reason, "the embedded preset departs from the locked defaults and must say why"


def test_cluster_preset_keeps_the_locked_defaults():
    cfg = config.load(overrides={"experiment": {"preset": "cluster"}})
    c = cfg.consolidate
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.epochs, c.weight_decay) == (64, 64, 0.05, 2.0, 0.01)
    assert (c.replay_fraction, c.replay_rounds, c.kl_lambda, c.kl_prompts) == (0.2, 5, 0.05, 50)
    assert cfg.collect.rollouts == 48 and cfg.env.timeout_s == 600.0 and cfg.loop.eval_every == 2


def test_config_is_frozen():
    cfg = config.load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.env.budget_s = 1.0  # type: ignore[misc]


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "[env]\nbudget_seconds = 30\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and "env.budget_seconds" in str(e.value) and "budget_s" in str(e.value)


def test_wrong_type_says_what_was_expected(tmp_path):
    p = write(tmp_path, '[collect]\nrollouts = "four"\n')
    with pytest.raises(ConfigError, match=r"collect.rollouts: expected int"):
        config.load(p)


def test_bad_value_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="experiment.arms"):
        config.load(write(tmp_path, '[experiment]\narms = ["X"]\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[env\n"))
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="preset"):
        config.load(write(tmp_path, '[experiment]\npreset = "laptop"\n'))


def test_experiment_files_load_and_round_trip(tmp_path):
    for name in ("embedded", "cluster"):
        cfg = config.load(config.ROOT / "experiments" / f"{name}.toml")
        frozen = write(tmp_path, config.to_toml(cfg), f"{name}-frozen.toml")
        assert config.load(frozen) == cfg


def test_hosts_default_is_local_slots_off_the_server_core():
    hf = hosts.load()
    slots = hosts.slots(hf)
    assert slots and all(s.launcher == "local" for s in slots)
    assert all(set(s.cpus).isdisjoint(hf.server.cpus) for s in slots) or len(slots) == 1


def test_hosts_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"slot\[0\].host"):
        hosts.load(write(tmp_path, '[[slot]]\nlauncher = "ssh"\nhost = "gpu9"\n', "h.toml"))
    with pytest.raises(ConfigError, match=r"hosts.gpu1.adress"):
        hosts.load(write(tmp_path, '[hosts.gpu1]\nadress = "x"\n', "h.toml"))
