"""The part is whole: Succeeded, with what it holds in words."""

from __future__ import annotations

from ... import contract
from .base import Run


def wanted(run: Run) -> bool:
    return True


def run(run: Run) -> str:
    summary = run.written_summary()
    if run.wrote or summary.latents is None:
        message = f"{run.tracker.progress.images_ok} images in {run.store.uri}"
    else:  # the latents stage alone
        message = f"{summary.latents.samples} latents in {run.store.url(contract.LATENTS_DIR)}"
    run.tracker.finish(message)
    return message
