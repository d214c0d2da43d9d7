"""`python rfs.py env run FILE.py`: any train.py through the trusted harness on a local slot, its
summary printed; a broken one prints its status and the end of its error, and exits 1."""

from __future__ import annotations

import re
import subprocess
import sys

from rfs import ROOT

TINY = {"DEPTH": "1", "N_EMBD": "32", "N_HEAD": "2", "SEQ_LEN": "32", "BATCH_SIZE": "8"}
QUICK = '[experiment]\nname = "envrun"\npreset = "embedded"\n[env]\nbudget_s = 1.0\ntimeout_s = 60.0\n'


def env_run(tmp_path, train_py: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "short.toml").write_text(QUICK)
    args = [sys.executable, "rfs.py", "env", "run"]
    if train_py is not None:
        (tmp_path / "train.py").write_text(train_py)
        args.append(str(tmp_path / "train.py"))
    return subprocess.run([*args, "--experiment", str(tmp_path / "short.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def tiny_seed() -> str:
    seed = (ROOT / "env" / "builtin" / "train.py").read_text()
    for name, value in TINY.items():
        seed = re.sub(rf"^{name} = \S+", f"{name} = {value}", seed, count=1, flags=re.M)
    return seed


def test_a_good_train_py_prints_the_harness_summary(tmp_path):
    p = env_run(tmp_path, tiny_seed())
    assert p.returncode == 0, p.stdout + p.stderr
    (line,) = [x for x in p.stdout.splitlines() if "status=" in x]
    assert re.search(r"train.py: status=success val_bpb=\d+\.\d{4} steps=[1-9]\d* training_seconds=\d", line), line


def test_a_broken_train_py_prints_its_status_and_error_tail_and_exits_1(tmp_path):
    broken = tiny_seed().replace("import prepare\n", "import prepare\nraise RuntimeError('no such schedule')\n", 1)
    p = env_run(tmp_path, broken)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "status=crash val_bpb=nan" in p.stdout and "RuntimeError: no such schedule" in p.stdout
    tail = p.stdout.split("lines of its output:\n", 1)[1]
    assert "raise RuntimeError('no such schedule')" in tail and "num_steps:" not in tail  # the summary once


def test_a_missing_file_is_one_line_and_exit_2(tmp_path):
    p = env_run(tmp_path, None)
    assert p.returncode == 2 and p.stderr.strip() == "rfs: env run needs a train.py: `python rfs.py env run path/to/train.py`"
