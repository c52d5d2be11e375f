"""The entrypoint of a part's Ray job (`laion-operator job`): the spec comes in LAION_PART_SPEC.

Exit codes tell the operator what a retry can do: 0 done, 1 shards failed (a retry resumes them),
2 the input is wrong (a retry cannot help).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from . import credentials
from .columns import ColumnError
from .filter import MetadataError
from .spec import PartSpec, SpecError
from .status import Progress
from .storage import StorageError

log = logging.getLogger("laion_operator.job")
INPUT_ERROR = 2


def log_progress(p: Progress) -> None:
    log.info("part %s: %s, shards %d/%d (%d failed), images %d ok %d failed, %.1f%% success",
             p.part_id, p.phase, p.shards_done, p.shards_total, p.shards_failed, p.images_ok, p.images_failed,
             p.success_rate)


def main() -> int:
    from .pipeline import PartFailed, ensure_ray, run_part

    credentials.load_into_environment()
    try:
        spec = PartSpec.from_dict(json.loads(os.environ["LAION_PART_SPEC"]))
    except KeyError:
        log.error("LAION_PART_SPEC is not set: this command runs inside a part's Ray job")
        return INPUT_ERROR
    except (SpecError, json.JSONDecodeError) as err:
        log.error("LAION_PART_SPEC: %s", err)
        return INPUT_ERROR
    ensure_ray()
    try:
        summary = run_part(spec, on_progress=log_progress)
    except PartFailed as err:
        log.error("part %s failed: %s", spec.part_id, err)
        return 1
    except (ColumnError, MetadataError, StorageError) as err:
        log.error("part %s cannot run: %s", spec.part_id, err)
        return INPUT_ERROR
    json.dump(summary, sys.stdout, indent=2)
    return 0
