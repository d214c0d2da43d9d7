"""`rfs rehearse`: the cluster layout rehearsed on this machine before a long run.

It runs tests/test_rehearsal.py: the real controller over a real local SLURM (started for the
rehearsal) and real sshd on two loopback addresses, vLLM replaced by tests/vllm_standin.py (vLLM's command line,
the scripted researcher's replies, the GPUs it was given recorded), short stand-in jobs; gold A-S
beside CTRL for 2 rounds with the slot pool's allocation scancelled mid-wave. It needs the `dev`
extra (pytest) and slurm-wlm, munge and openssh-server installed (see tests/infra.py).
"""

from __future__ import annotations

import subprocess
import sys

from rfs import ROOT

REHEARSAL = ROOT / "tests" / "test_rehearsal.py"


def rehearse(verbose: bool = False) -> int:
    """Run the rehearsal; its exit code, with what it printed (wall time, placement) shown."""
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-m", "slow", "-p", "no:cacheprovider", str(REHEARSAL)]
    print(f"rehearsing the cluster layout on this machine: {' '.join(argv[2:])}", flush=True)
    out = subprocess.run(argv, cwd=ROOT, capture_output=not verbose, text=True)
    if not verbose:
        shown = [l for l in out.stdout.splitlines()
                 if l.startswith(("rehearsal wall time", "placement:", "  ", "FAILED", "E ")) or "passed" in l]
        print("\n".join(shown))
    print("rehearsal passed" if out.returncode == 0 else "rehearsal FAILED (run with --verbose for everything)")
    return out.returncode
