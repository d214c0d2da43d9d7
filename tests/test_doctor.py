import shutil
import subprocess
import sys

from rfs import ROOT
from rfs.doctor import check_hosts, check_manifest


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
