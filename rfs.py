#!/usr/bin/env python3
"""Entry point: `python rfs.py run|resume|watch|report|setup|doctor|env …` (see --help)."""

from rfs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
