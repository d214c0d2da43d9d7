"""The object-storage mirror (fsspec): what changed goes up before each fit and publish, each file
whole; `resume --from` rebuilds the run elsewhere; a kill -9 then a resume from the mirror into a
fresh directory ends with the same traces and models as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest

from rfs import ROOT
from rfs.config import ConfigError, MirrorCfg
from rfs.mirror import restore, sync
from rfs.rundir import RunDir
from tests.test_loop import ROUNDS, N, final_state, own_cache, researcher, tiny  # noqa: F401  (fixtures)
from tests.test_loop import _kill_when


def a_run(root: Path) -> RunDir:
    run = RunDir(root)
    (root / "traces" / "A-S").mkdir(parents=True)
    run.config.write_text("[experiment]\nname = 'x'\n")
    run.traces("A-S", 1).write_bytes(b"round one")
    (root / "models" / "A-S" / "v1").mkdir(parents=True)
    (run.model("A-S", 1) / "model.safetensors").write_bytes(os.urandom(4096))
    run.write_state({"loops": {"A-S": {"round": 1}}})
    (root / "controller.lock").write_text("pid 1")
    return run


def test_sync_copies_what_changed_each_file_whole_and_never_the_lock(tmp_path):
    url = f"memory://rfs-test-{uuid.uuid4().hex}/run"
    fs, root = fsspec.core.url_to_fs(url)
    run = a_run(tmp_path / "run")
    assert sync(MirrorCfg(url), run) == 4
    assert sorted(p[len(root) + 1:] for p in fs.find(root)) == [
        "experiment.toml", "models/A-S/v1/model.safetensors", "state.json", "traces/A-S/round-1.parquet"]
    assert fs.cat(f"{root}/models/A-S/v1/model.safetensors") == (run.model("A-S", 1) / "model.safetensors").read_bytes()
    assert sync(MirrorCfg(url), run) == 0  # nothing changed: nothing goes up again
    run.write_state({"loops": {"A-S": {"round": 2}}})
    assert sync(MirrorCfg(url), run) == 1 and b'"round": 2' in fs.cat(f"{root}/state.json")
    assert sync(MirrorCfg(""), run) == 0


def test_restore_rebuilds_the_run_and_refuses_a_used_directory(tmp_path):
    url = (tmp_path / "bucket" / "run").as_uri()
    run = a_run(tmp_path / "run")
    sync(MirrorCfg(url), run)
    (tmp_path / "bucket" / "run" / "traces" / "A-S" / "round-2.parquet.part").write_bytes(b"half")  # a copy cut short
    new = restore(url, tmp_path / "elsewhere")
    for rel in ("experiment.toml", "state.json", "traces/A-S/round-1.parquet", "models/A-S/v1/model.safetensors"):
        assert (new.root / rel).read_bytes() == (run.root / rel).read_bytes(), rel
    assert not list(new.root.rglob("*.part")) and not (new.root / "controller.lock").exists()
    assert sync(MirrorCfg(url), new) == 0  # what came down is not sent back up
    with pytest.raises(ConfigError, match="not empty"):
        restore(url, tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="no run mirrored"):
        restore((tmp_path / "nothing").as_uri(), tmp_path / "other")


def _child(run_dir: Path, researcher, tiny: Path, counter: Path, mirror: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.loop_child", str(run_dir), researcher.base_url, str(tiny), str(counter),
         "--rounds", str(ROUNDS), "--rollouts", str(N), "--no-probes", "--mirror", mirror],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_kill9_then_resume_from_the_mirror_elsewhere_ends_like_an_uninterrupted_run(tmp_path, tiny, researcher):
    reference = RunDir(tmp_path / "reference")
    ref = _child(reference.root, researcher, tiny, tmp_path / "ref-launches")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:]

    url = (tmp_path / "bucket" / "matrix").as_uri()
    first = RunDir(tmp_path / "machine-1")
    proc = _child(first.root, researcher, tiny, tmp_path / "launches", mirror=url)
    assert _kill_when(proc, first.events, "consolidated", None, 3), "the run finished before the kill"
    # machine 1 is gone with its disk: only the mirror is left
    second = restore(url, tmp_path / "machine-2")
    assert second.traces("shared", 1).exists() and any(second.root.glob("models/*/v1/manifest.json"))
    proc = _child(second.root, researcher, tiny, tmp_path / "launches", mirror=url)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert final_state(second) == final_state(reference)
