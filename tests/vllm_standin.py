#!/usr/bin/env python3
"""STAND-IN for the `vllm` executable (a test double) at the path the tests give as
researcher.vllm.executable; the stand-in itself is rfs/rehearsal/vllm_standin.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rfs.rehearsal.vllm_standin import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
