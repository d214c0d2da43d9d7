"""rfs: recursive fine-tuning stability."""

import os
from pathlib import Path

__version__ = "0.1.0"
ROOT = Path(__file__).resolve().parent.parent  # the checkout: env/, experiments/, hosts.toml live here

# Arrow's default allocator (mimalloc) made the compaction at the end of a wave cost more than twice
# the CPU of the system allocator (docs/LOG.md). Read by Arrow at its first allocation; a value
# already set decides.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
