"""The pipeline: what runs inside Ray for a part — filter → download (resize, writers) → annotate.

`driver.run_part` runs the stages; `job` is the Ray job's entry point; `local` runs a part on this
machine with a progress line. Nothing here is imported by the operator (`control/`).
"""

import os as _os

# albumentations (through img2dataset) asks PyPI for a newer version on import: a network call per
# process that hangs where egress is closed, as on most clusters.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Arrow allocations from jemalloc rather than mimalloc, Arrow's default: mimalloc hands freed batch
# memory back to the OS at once and faults it in again for the next batch, about 30 % more CPU in the
# filter (bench/README.md). Arrow reads this when it is first imported, which is below this package.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
