"""The pipeline: what runs inside Ray for a part — filter → download (fetch, resize) or convert, each
sample recorded by `record` (resized, its metadata row, counted, written) → annotate → verify → latents
→ heal.

`stages/` holds the stages, one module each with one entry, run in order by `driver` from the list
`stages.PART`; the shard stages run through `runtime.Pool` (Ray tasks returning a typed `Outcome`)
with their progress kept by `tracker.Tracker`. Below them, each stage's work has its module (`filter`,
`download`, `convert`, `annotate`, `verify`, `latents`, `heal`), reading the part's input through
`sources/` (one module per kind of input) and writing through `formats/` (one module per output
format) and `fetch/`. `job` is the Ray job's entry point; `local` runs a part on this machine with a
progress line. Nothing here is imported by the operator (`control/`).
"""

import os as _os

# albumentations (through img2dataset) asks PyPI for a newer version on import: a network call per
# process that hangs where egress is closed, as on most clusters.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Arrow allocations from jemalloc rather than mimalloc, Arrow's default: mimalloc hands freed batch
# memory back to the OS at once and faults it in again for the next batch, about 30 % more CPU in the
# filter (bench/README.md). Arrow reads this when it is first imported, which is below this package.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")


def load_light() -> None:
    """Import img2dataset's writers and resizer without what a Ray worker never runs.

    Every Ray worker of a part imports this package, and on a busy 2-core node the pipeline took 11 s
    a process to import, 3 s without these (`python -X importtime`): img2dataset's `__init__` loads
    its CLI (fire, wandb, both distributors), and webdataset and tfrecord load torch, where it is
    installed, for DataLoaders the pipeline never builds. The package's modules are found through its `__path__`
    without running its `__init__`, and webdataset falls back to its stand-ins for torch's classes.
    Only for processes that are the pipeline's alone (Ray workers, the job's driver, the `laion-operator`
    command running a part): elsewhere, as in a notebook that also trains, webdataset and img2dataset
    stay whole.
    """
    import importlib.util
    import sys

    if "img2dataset" not in sys.modules:
        spec = importlib.util.find_spec("img2dataset")
        if spec is not None:
            sys.modules["img2dataset"] = importlib.util.module_from_spec(spec)  # not executed
    if "torch" not in sys.modules:
        # an import of torch now fails, as where it is not installed (None is importlib's "not here";
        # typeshed types sys.modules' values as modules only)
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tfrecord  # noqa: F401 - the TFRecord format's protobuf classes; its torch glue goes
            import webdataset  # noqa: F401 - loaded now, while torch is hidden, for the stages that import it later
        finally:
            del sys.modules["torch"]


def _in_ray_worker() -> bool:
    import sys

    ray = sys.modules.get("ray")  # a Ray worker has imported it, and connected, before it unpickles a task
    try:
        # is_initialized first: get_runtime_context() in a process not yet connected starts a local Ray
        # (Ray's auto-init), and a driver about to join a cluster would be left on that one instead.
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - no Ray runtime here
        return False


if _in_ray_worker():
    load_light()
