"""The local launcher's sweep after a job that ends on its own: the path that skips the kill rounds
when nothing is left must still find what a successful job left running, in its group or not."""

from __future__ import annotations

import sys
import textwrap

import anyio
import pytest

from rfs.launch.base import Job
from rfs.launch.local import LocalLauncher
from tests.test_launch_local import FORKER, SLOT, _alive, _pids

# The shell starts FORKER (a child in the group, a double-forked daemon outside it) in the
# background, waits until its three processes are up, then exits 0 and leaves them running.
GROUP_AND_DAEMON = '"$PY" -c "$FORKER" & while [ "$(wc -l < "$PIDS_FILE" 2>/dev/null || echo 0)" -lt 3 ]; do sleep 0.05; done; echo left'

# Only a double-forked daemon is left: the job's process group is empty when the job ends.
DAEMON_ONLY = textwrap.dedent(
    """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(os.environ["PIDS_FILE"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(1000)
        os._exit(0)
    os.wait()
    while not os.path.exists(os.environ["PIDS_FILE"]) or not open(os.environ["PIDS_FILE"]).read().endswith("\\n"):
        time.sleep(0.01)
    print("left", flush=True)
    """
)


@pytest.mark.parametrize("argv, n", [(("/bin/sh", "-c", GROUP_AND_DAEMON), 3), ((sys.executable, "-c", DAEMON_ONLY), 1)], ids=["group+daemon", "daemon"])
def test_a_job_that_exits_cleanly_leaves_nothing_running(tmp_path, argv, n):
    pids_file = tmp_path / "pids"
    env = {"PIDS_FILE": str(pids_file), "PY": sys.executable, "FORKER": FORKER}
    out = anyio.run(LocalLauncher().run, SLOT, Job("leaver", argv, {}, 60.0, env))
    assert out.exit_code == 0 and not out.timed_out and out.infra_error == "" and b"left" in out.output
    assert [p for p in _pids(pids_file, n) if _alive(p)] == []
