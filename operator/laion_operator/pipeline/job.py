"""The entrypoint of a part's Ray job (`laion-operator job`): the spec comes in LAION_PART_SPEC.

Its exit code (`contract.ExitCode`) tells the operator what a retry can do.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from .. import credentials
from ..contract import JOB_ID_ENV, ExitCode, Progress
from ..errors import InputError
from ..spec import PartSpec

log = logging.getLogger("laion_operator.job")


def log_progress(p: Progress) -> None:
    log.info(
        "part %s: %s, shards %d/%d (%d failed), images %d ok %d failed, %.1f%% success",
        p.part_id,
        p.phase,
        p.shards_done,
        p.shards_total,
        p.shards_failed,
        p.images_ok,
        p.images_failed,
        p.success_rate,
    )


def main() -> int:
    from . import load_light

    load_light()  # this process only runs the part
    from .driver import run_part
    from .runtime import ENDED, ending, ensure_ray

    credentials.load_into_environment()
    try:
        spec = PartSpec.from_dict(json.loads(os.environ["LAION_PART_SPEC"]))
    except KeyError:
        log.error("LAION_PART_SPEC is not set: this command runs inside a part's Ray job")
        return ExitCode.BAD_INPUT
    except (InputError, json.JSONDecodeError) as err:
        log.error("LAION_PART_SPEC: %s", err)
        return ExitCode.BAD_INPUT
    ensure_ray()
    try:
        summary = run_part(spec, on_progress=log_progress, job=os.environ.get(JOB_ID_ENV, ""))
    except ENDED as err:
        code, message = ending(spec.part_id, err)
        log.error("%s", message)
        return code
    json.dump(summary, sys.stdout, indent=2)
    return ExitCode.OK
