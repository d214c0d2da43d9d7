import os
import shutil
import subprocess
import sys

from rfs import ROOT
from rfs.doctor import check_hosts, check_manifest
from tests.infra import slurm, sshd  # noqa: F401  (fixtures)


def test_manifest_matches_the_checkout():
    assert check_manifest() == []


def test_a_tampered_or_missing_harness_file_is_named(tmp_path):
    shutil.copytree(ROOT / "env", tmp_path / "env")
    (tmp_path / "env" / "builtin" / "prepare.py").write_text("# edited\n")
    (tmp_path / "env" / "builtin" / "program.md").unlink()
    problems = check_manifest(tmp_path)
    assert any("prepare.py differs" in p for p in problems)
    assert any("program.md is missing" in p for p in problems)


def test_unreachable_host_and_bad_hosts_file(tmp_path):
    bad = tmp_path / "hosts.toml"
    bad.write_text('[hosts.gpu1]\naddress = "127.0.0.1"\nport = 1\n')
    assert any("gpu1" in p and "unreachable" in p for p in check_hosts(bad))
    bad.write_text("[[slot]]\nlauncher = 'pbs'\n")
    assert any("launcher" in p for p in check_hosts(bad))


def test_doctor_prints_one_line_per_check():
    out = subprocess.run([sys.executable, "rfs.py", "doctor"], cwd=ROOT, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert {l.split()[0] for l in lines} <= {"ok", "FAIL"} and len(lines) >= 6
    assert out.returncode == (1 if any(l.startswith("FAIL") for l in lines) else 0)


def test_doctor_hosts_prints_one_line_per_host_and_cluster_check(sshd, slurm, tmp_path):
    """Real sshd on loopback, real SLURM, the stand-in vllm; one host made unreachable is one FAIL line."""
    from tests.infra import free_port

    h = sshd.host
    hosts_toml = tmp_path / "hosts.toml"
    hosts_toml.write_text(f"""
[slurm]
partition = "debug"
time_limit = "00:10:00"
cpus_per_slot = 2

[hosts.node1]
address = "{h.address}"
port = {h.port}
user = "{h.user}"
key = "{h.key}"
python = "{h.python}"
root = "{h.root}"

[hosts.node2]
address = "127.0.0.1"
port = {free_port()}
user = "{h.user}"
key = "{h.key}"

[[slot]]
launcher = "ssh"
host = "node1"

[[slot]]
launcher = "slurm"

[[slot]]
launcher = "slurm"
""")
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[researcher]\nbackend = "vllm"\n[researcher.vllm]\nexecutable = "{ROOT / "tests" / "vllm_standin.py"}"\n')
    out = subprocess.run([sys.executable, "rfs.py", "doctor", "--hosts", str(hosts_toml), "--experiment", str(exp)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, **slurm.env}, timeout=120)
    lines = out.stdout.strip().splitlines()
    print(out.stdout)
    cluster = lines[next(i for i, l in enumerate(lines) if "node1" in l and "hosts" not in l.split(":")[0]):]
    assert [l.split()[0] for l in cluster] == ["ok", "ok", "FAIL", "ok", "ok", "ok"], out.stdout
    assert "node2" in cluster[2] and "unreachable" in cluster[2]
    assert "rfs " in cluster[1] and "env manifest" in cluster[1]
    assert "sbatch --test-only" in cluster[5] and out.returncode == 1


def test_the_slurm_check_names_a_shape_the_partition_refuses(slurm, monkeypatch):
    from rfs.doctor import check_slurm_shape
    from rfs.hosts import HostsFile, SlotCfg

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    fits = HostsFile(slurm=slurm.cfg, slot=(SlotCfg(launcher="slurm", cpus=(0, 1)),) * 2)
    assert check_slurm_shape(fits) == []
    too_big = HostsFile(slurm=slurm.cfg, slot=(SlotCfg(launcher="slurm", cpus=tuple(range(slurm.cpus + 1))),))
    assert "refuses" in check_slurm_shape(too_big)[0]


def test_a_host_whose_rfs_checkout_differs_is_named(sshd, tmp_path):
    from dataclasses import replace

    from rfs.doctor import check_host, probe_here
    from rfs.hosts import HostsFile

    shutil.copytree(ROOT / "rfs", tmp_path / "rfs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "env", tmp_path / "env", ignore=shutil.ignore_patterns("__pycache__"))
    host = replace(sshd.host, root=str(tmp_path))
    here = probe_here()
    assert [p for _, p in check_host("n", host, HostsFile(hosts={"n": host}), here)] == [[], []]  # the same checkout
    (tmp_path / "rfs" / "trace.py").write_text((tmp_path / "rfs" / "trace.py").read_text() + "\n# edited\n")
    (tmp_path / "env" / "MANIFEST.sha256").write_text((ROOT / "env" / "MANIFEST.sha256").read_text())
    next((tmp_path / "env").rglob("prepare.py")).write_text("# edited\n")
    [(_, reach), (line, problems)] = check_host("n", host, HostsFile(hosts={"n": host}), here)
    assert reach == [] and "rfs code" in problems[0] and "harness files differ" in problems[1], problems


def provisioned_tree(tmp_path, commit: str):
    """A fake of what env/autoresearch/vendor.sh leaves on a host (no network, no uv): the checkout
    at the pinned commit with its pristine files, .venv, .rfs-env and stamp; the host-local kernel
    marker; prepare.py's data and tokenizer under that host's $HOME. Returns (rfs root, home)."""
    root, home, cache = tmp_path / "node", tmp_path / "home", tmp_path / "local-cache"
    checkout = root / "env" / "autoresearch" / "checkout"
    for d in (checkout / ".git", checkout / ".rfs-pristine", checkout / ".venv" / "bin", cache / "hf",
              home / ".cache" / "autoresearch" / "data", home / ".cache" / "autoresearch" / "tokenizer"):
        d.mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text(commit + "\n")
    for name in ("prepare.py", "train.py", ".venv/bin/python"):
        (checkout / ".rfs-pristine" / name if "/" not in name else checkout / name).write_text("# stand-in\n")
    (checkout / ".rfs-env").write_text(f"HF_HOME={cache / 'hf'}\nHF_HUB_OFFLINE=1\nTRANSFORMERS_OFFLINE=1\n")
    (checkout / ".rfs-provisioned").write_text(commit + "\n")
    (cache / f".kernel-{commit}").touch()
    for f in ("data/shard_00000.parquet", "data/shard_06542.parquet", "tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt"):
        (home / ".cache" / "autoresearch" / f).write_bytes(b"stand-in")
    return root, home


def test_doctor_hosts_names_a_host_not_provisioned_for_autoresearch(sshd, tmp_path):
    """Real ssh to the loopback sshd; the host's Python runs with that host's $HOME (a wrapper)."""
    from dataclasses import replace

    from rfs import config
    from rfs.doctor import check_host, probe_here
    from rfs.envs.autoresearch import upstream
    from rfs.hosts import HostsFile, SlotCfg

    commit = upstream()["commit"]
    root, home = provisioned_tree(tmp_path, commit)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nHOME={home} exec {sshd.host.python} "$@"\n')
    python.chmod(0o755)
    host = replace(sshd.host, root=str(root), python=str(python))
    hf = HostsFile(hosts={"n": host}, slot=(SlotCfg(launcher="ssh", host="n"),))
    cfg = config.load(None, {"env": {"name": "autoresearch"}})
    here = probe_here()

    def line() -> tuple[str, list[str]]:
        return check_host("n", host, hf, here, cfg)[-1]

    assert line() == (f"host n: autoresearch provisioned at {commit}", [])
    (tmp_path / "local-cache" / f".kernel-{commit}").unlink()  # vendor.sh stopped before the kernel fetch
    (home / ".cache" / "autoresearch" / "tokenizer" / "token_bytes.pt").unlink()
    name, [problem] = line()
    assert name == "host n" and problem.startswith("autoresearch not provisioned (")
    missing = problem[problem.index("(") + 1:problem.index("); run")]
    assert "attention kernel cache" in missing and "token_bytes.pt" in missing and "checkout" not in missing, missing
    assert problem.endswith(f"run env/autoresearch/vendor.sh {root / 'env/autoresearch/checkout'} there")
    # the builtin environment needs none of it; a host without slots is not asked
    assert all("autoresearch" not in n for n, _ in check_host("n", host, hf, here, config.load(None)))
    assert all("autoresearch" not in n for n, _ in check_host("n", host, HostsFile(hosts={"n": host}), here, cfg))


def test_doctor_hosts_prints_each_slot_hosts_autoresearch_provisioning(sshd, tmp_path):
    """`rfs.py doctor --hosts` over real ssh: node1 provisioned, node2 missing its data; one line each."""
    from rfs.envs.autoresearch import upstream

    commit = upstream()["commit"]
    h = sshd.host
    toml = ""
    for node in ("node1", "node2"):
        root, home = provisioned_tree(tmp_path / node, commit)
        python = tmp_path / node / "python"
        python.write_text(f'#!/bin/sh\nHOME={home} exec {h.python} "$@"\n')
        python.chmod(0o755)
        toml += (f'[hosts.{node}]\naddress = "{h.address}"\nport = {h.port}\nuser = "{h.user}"\nkey = "{h.key}"\n'
                 f'python = "{python}"\nroot = "{root}"\n\n[[slot]]\nlauncher = "ssh"\nhost = "{node}"\n\n')
    for shard in (tmp_path / "node2" / "home" / ".cache" / "autoresearch" / "data").iterdir():
        shard.unlink()  # prepare.py never ran to the end there
    (tmp_path / "hosts.toml").write_text(toml)
    (tmp_path / "exp.toml").write_text('[env]\nname = "autoresearch"\n')
    out = subprocess.run([sys.executable, "rfs.py", "doctor", "--hosts", str(tmp_path / "hosts.toml"),
                          "--experiment", str(tmp_path / "exp.toml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(out.stdout)
    lines = [l for l in out.stdout.splitlines() if "autoresearch" in l]
    assert f"ok   host node1: autoresearch provisioned at {commit}" in lines, out.stdout
    [node2] = [l for l in lines if "host node2" in l]
    assert node2.startswith("FAIL host node2: autoresearch not provisioned (data shards in ") and "vendor.sh" in node2
    assert any(l.startswith(("ok   host localhost", "FAIL host localhost")) for l in lines)  # the controller too
    assert out.returncode == 1
