"""rfs: recursive fine-tuning stability."""

import os
from pathlib import Path

__version__ = "0.1.0"
ROOT = Path(__file__).resolve().parent.parent  # the checkout: env/, experiments/, hosts.toml live here

# Arrow's default allocator (mimalloc) made the compaction at the end of a wave (a worker thread
# building and writing a 48-row Parquet file) cost 15 to 40 ms of CPU, against 11 to 14 ms with the
# system allocator (dev VM). Read by Arrow at its first allocation; a value already set still decides.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
