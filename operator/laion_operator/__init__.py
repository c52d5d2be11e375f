"""laion-operator: LAION metadata parts to training-ready image datasets, on Ray."""

__version__ = "0.1.0"

import os as _os

# albumentations (through img2dataset) asks PyPI for a newer version on import: a network call per
# process that hangs where egress is closed, as on most clusters.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Arrow allocations from jemalloc rather than mimalloc, Arrow's default: mimalloc hands freed batch
# memory back to the OS at once and faults it in again for the next batch (bench/README.md). Read when
# pyarrow is first imported, hence here.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
