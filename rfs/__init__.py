"""rfs: recursive fine-tuning stability."""

from pathlib import Path

__version__ = "0.1.0"
ROOT = Path(__file__).resolve().parent.parent  # the checkout: env/, experiments/, hosts.toml live here
