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
