"""The object-storage mirror: the run directory copied to an fsspec URL before every LoRA fit and
every publish of a merged model, so a preempted controller never loses a round.

`resume --from <url>` rebuilds the run directory from the mirror on any machine, and the
controller's resume re-enters the interrupted phase from there (rfs/loop/round.py).

Each file goes up under a `.part` name and is renamed into place, so the mirror never holds half a
file under its real name; state.json goes last, so the mirror's state never names a file it lacks.
A local record (RunDir.mirrored) of each copied file's size and mtime keeps unchanged files (the
models, the finished rounds' traces) from going up twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import fsspec

from rfs import atomic
from rfs.config import ConfigError, MirrorCfg
from rfs.rundir import RunDir

# Local only: the controller's lock, the mirror's own record, temp names of atomic writes.
_LOCAL = ("controller.lock", "mirror.json")


def _local_files(run: RunDir) -> list[Path]:
    files = [p for p in run.root.rglob("*") if p.is_file() and p.name not in _LOCAL and ".tmp" not in p.name]
    return sorted(files, key=lambda p: (p == run.state, str(p)))  # state.json last


def sync(cfg: MirrorCfg, run: RunDir) -> int:
    """Copy what changed in `run` since the last sync to cfg.url; returns how many files went up."""
    if not cfg.url:
        return 0
    fs, root = fsspec.core.url_to_fs(cfg.url)
    done = json.loads(run.mirrored.read_text()) if run.mirrored.exists() else {}
    sent = 0
    for path in _local_files(run):
        rel = path.relative_to(run.root).as_posix()
        try:
            st = path.stat()
        except FileNotFoundError:  # a pending row compacted away while we walked
            continue
        if done.get(rel) == [st.st_size, st.st_mtime_ns]:
            continue
        remote = f"{root}/{rel}"
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        try:
            fs.put_file(str(path), remote + ".part")
        except FileNotFoundError:
            continue
        fs.mv(remote + ".part", remote)
        done[rel] = [st.st_size, st.st_mtime_ns]
        sent += 1
    atomic.write_json(run.mirrored, done)
    return sent


async def push(cfg: MirrorCfg, run: RunDir) -> None:
    """sync() off the event loop: the copy of a 7B model takes minutes, the waves go on meanwhile."""
    if cfg.url:
        await anyio.to_thread.run_sync(sync, cfg, run)


def restore(url: str, dest: Path) -> RunDir:
    """Rebuild a run directory at `dest` from the mirror at `url` (`rfs resume --from`)."""
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root}/experiment.toml"):
        raise ConfigError(f"{url}: no run mirrored there (no experiment.toml); check mirror.url of the run")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest}: not empty; resume --from rebuilds a run into a new directory")
    run = RunDir(dest)
    done = {}
    for remote in sorted(fs.find(root)):
        rel = remote[len(root.rstrip("/")) + 1:]
        if rel.endswith(".part"):  # a copy the mirrored controller did not finish
            continue
        local = dest / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
        st = local.stat()
        done[rel] = [st.st_size, st.st_mtime_ns]
    atomic.write_json(run.mirrored, done)  # already in the mirror: not sent back up
    return run
