"""The rehearsal's controller process: `rfs run`/`rfs resume --from` as they are, with stand-in jobs.

    python -m rfs.rehearsal.controller RUN_DIR HOSTS.toml [--from URL] [--sleep S]

RUN_DIR holds the experiment.toml the rehearsal wrote; with --from, RUN_DIR is rebuilt from the
mirror first, as `resume --from` does. The one difference from the real commands is the
environment: SleepEnv's stand-in jobs instead of the configured one (rfs rehearse kills this
process with -9, so it must be a process of its own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfs import config, hosts, mirror
from rfs.loop.driver import drive
from rfs.rehearsal.jobs import SleepEnv
from rfs.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rfs.rehearsal.controller")
    p.add_argument("run_dir")
    p.add_argument("hosts")
    p.add_argument("--from", dest="from_url", default="", help="rebuild RUN_DIR from this mirror first")
    p.add_argument("--sleep", type=float, default=1.0, help="seconds each stand-in job sleeps")
    a = p.parse_args(argv)
    if a.from_url:
        mirror.restore(a.from_url, Path(a.run_dir))
    run = RunDir(Path(a.run_dir))
    return drive(config.load(run.config), run, hosts.load(Path(a.hosts)), plain=True, env=SleepEnv(None, a.sleep))


if __name__ == "__main__":
    sys.exit(main())
