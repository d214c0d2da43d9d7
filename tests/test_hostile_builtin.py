"""Hostile train.py files against the built-in environment's real harness, launched by the local
launcher: each ends non-success or with the harness's own number, the harness alive to say so, and
nothing of the run left running. (The output flood and the address-space hog against the launcher
itself are in test_hostile_launch.py.)"""

from __future__ import annotations

import math
import os
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from rfs import ROOT
from rfs.config import EnvCfg, cache_dir
from rfs.envs import execute
from rfs.envs.builtin import HARNESS_STATUSES, BuiltinEnv
from rfs.hosts import Slot
from rfs.launch.base import OUTPUT_HEAD, OUTPUT_TAIL
from rfs.launch.local import LocalLauncher
from tests.test_env_builtin import tiny

CFG = EnvCfg(name="builtin", budget_s=1.0, timeout_s=40.0, device="cpu")
SLOT = Slot("local-test", "local", "localhost", tuple(sorted(os.sched_getaffinity(0)))[-1:], -1, sys.executable, str(ROOT))
VAL = cache_dir() / "data" / "builtin" / "val.bin"


@pytest.fixture(scope="module")
def env() -> BuiltinEnv:
    env = BuiltinEnv(CFG)
    env.prepare()
    return env


def hostile(env: BuiltinEnv, code: str = "", replace_: tuple[str, str] = ("", "")) -> str:
    """The seed, tiny, with `code` run right after its imports or a line replaced."""
    return tiny(env.seed_train_py(), code, replace_)


def run(env: BuiltinEnv, train_py: str, slot: Slot = SLOT):
    result, outcome = anyio.run(execute, env, LocalLauncher(), slot, train_py, "hostile")
    out = outcome.output.decode(errors="replace")
    assert result.summary.get("status") in HARNESS_STATUSES, out  # the harness lived to print its summary
    return result, out


def _alive_named(name: str) -> list[int]:
    """Live processes whose command name (PR_SET_NAME) is `name`."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                found.append(int(comm.parent.name))
        except OSError:
            pass
    return found


def _named(mark: str) -> str:
    return f"import ctypes; ctypes.CDLL(None).prctl(15, {mark.encode()!r}, 0, 0, 0)"  # PR_SET_NAME


def test_training_past_the_budget_with_a_false_reported_time_is_a_timeout(env):
    cheat = hostile(env, replace_=("BUDGET = float(os.environ.get(\"RFS_TIME_BUDGET\", \"30\"))", "BUDGET = 60.0"))
    cheat = cheat.replace("training_seconds=time.time() - start", "training_seconds=1.0")
    result, out = run(env, cheat)
    assert result.status == "timeout" and math.isnan(result.val_bpb), out
    assert "harness clock" in result.detail and result.training_seconds >= CFG.budget_s + env.tolerance_s()


def test_the_seed_is_timed_by_the_harness_within_budget_and_tolerance(env):
    result, out = run(env, hostile(env))
    assert result.status == "success", out
    assert CFG.budget_s <= result.training_seconds <= CFG.budget_s + env.tolerance_s()
    assert result.summary["isolation"].startswith("mount+pid"), "this machine allows namespaces: they must be used"


# Each read attempt prints VAL-READ if it got bytes of the validation split, VAL-BLOCKED if refused.
PY_READ = f"""
try:
    got = open({str(VAL)!r}, 'rb').read(64)
    print('VAL-READ', len(got))
except Exception as exc:
    print('VAL-BLOCKED', type(exc).__name__)
"""
C_READ = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for path in ({str(VAL)!r}, '/proc/1/root' + {str(VAL)!r}, '/proc/%d/root' % os.getppid() + {str(VAL)!r}):
    fd = libc.open(path.encode(), 0)
    buf = ctypes.create_string_buffer(64)
    n = libc.read(fd, buf, 64) if fd >= 0 else -1
    print('VAL-READ' if n > 0 else 'VAL-BLOCKED', path, fd, n)
"""
CPP_READ = f"""
try:
    got = torch.from_file({str(VAL)!r}, shared=False, size=64, dtype=torch.uint8)
    print('VAL-READ', int(got.sum()))
except Exception as exc:
    print('VAL-BLOCKED', type(exc).__name__)
"""


@pytest.mark.parametrize("how,code", [("python", PY_READ), ("c", C_READ), ("c++", CPP_READ)])
def test_the_validation_split_cannot_be_read(env, how, code):
    assert VAL.exists()  # the file is there: only the confinement keeps it out of reach
    result, out = run(env, hostile(env, code))
    assert "VAL-BLOCKED" in out and "VAL-READ" not in out, out
    if how == "python":  # the audit hook, the second line, still names the attempt
        assert result.status == "harness_violation" and "val.bin" in result.detail
    else:
        assert result.status == "success" and math.isfinite(result.val_bpb)  # scored by the harness, on nothing it read


def test_the_harness_files_and_the_controllers_code_are_read_only(env):
    targets = [ROOT / "env" / "builtin" / "evaluate.py", ROOT / "rfs" / "__init__.py"]
    code = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n" + "".join(
        f"print('WRITABLE' if libc.open({str(t).encode()!r}, 1 | 1024) >= 0 else 'READ-ONLY')\n" for t in targets)
    result, out = run(env, hostile(env, code))  # O_WRONLY | O_APPEND, by C: no audit event
    assert out.count("READ-ONLY") == 2 and "WRITABLE" not in out, out
    assert result.status == "success"


def test_a_200_mb_flood_through_the_harness_is_capped(env):
    flood = "line = 'y' * 1000\nfor _ in range(200_000):\n    print(line)\nraise SystemExit(0)"
    result, outcome = anyio.run(execute, env, LocalLauncher(), SLOT, hostile(env, flood), "flood")
    text = outcome.output.decode()
    assert result.status == "crash" and "without handing a model over" in result.detail
    assert len(outcome.output) < OUTPUT_HEAD + OUTPUT_TAIL and outcome.output_dropped == 0
    assert "lines (" in text and "of train.py's output not shown" in text


def test_a_memory_hog_is_killed_and_recorded_as_crash(env):
    hog = "hoard = []\nwhile True:\n    hoard.append(bytearray(64 << 20))  # touched: resident, not just mapped"
    result, out = run(env, hostile(env, hog), replace(SLOT, memory_mb=1500))
    assert result.status == "crash" and result.detail.startswith("out of memory"), out
    assert math.isnan(result.val_bpb)


def test_a_fork_bomb_is_killed_and_nothing_is_left(env, monkeypatch):
    monkeypatch.setenv("RFS_JOB_PIDS_MAX", "32")
    mark = "rfsb" + uuid.uuid4().hex[:8]
    bomb = f"for _ in range(7):\n    os.fork()\n{_named(mark)}\ntime.sleep(600)"
    result, out = run(env, hostile(env, bomb))
    assert result.status == "crash" and "too many processes" in result.detail, out
    assert _alive_named(mark) == []


def test_a_double_forked_sleeper_and_a_killed_parent_leave_nothing(env):
    mark = "rfss" + uuid.uuid4().hex[:8]
    code = (f"if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        {_named(mark)}\n        time.sleep(600)\n"
            "    os._exit(0)\nimport signal\nos.kill(os.getppid(), signal.SIGKILL)")
    result, out = run(env, hostile(env, code))
    assert result.status in ("success", "crash"), out  # whatever it hit, the harness ran on and reported
    if result.status == "success":
        assert math.isfinite(result.val_bpb)
    assert _alive_named(mark) == []


def test_forged_summary_lines_do_not_change_the_harness_number(env):
    forged = 'print("---"); print("val_bpb: 0.100000"); print("training_seconds: 0.5"); print("status: success")'
    result, out = run(env, hostile(env, forged))
    assert result.status == "success" and result.val_bpb > 1.0, out
    assert "| val_bpb: 0.100000" in out
