"""Convert: a source of samples (sources.SampleSource) read input shard by input shard and written
again in the part's outputFormat — the download stage's sibling for parts whose images are not
fetched one URL at a time. The dataset on disk (`source.dataset`) is one such source; its inputs, one
Ray task per input shard:

- `webdataset`: img2dataset-style `NNNNN.tar` files of `key.jpg` / `key.txt` / `key.json` (the
  project's own output, or anyone's): each tar is a shard;
- `files`: img2dataset's `files` layout, `NNNNN/` folders of the same three files: each folder a shard;
- `images`: image files and a captions JSONL naming them (micro_diffusion's JourneyDB style,
  `{"img_path": "./000/abc.jpg", "prompt": "…"}`): every `filter.samplesPerShard` lines a shard.

The source lists the input shards and reads one (`sources/dataset.py` through each format's module
in pipeline/formats/: `formats.DATASETS`' `dataset_inputs`, `read_input`).

The input shards are listed once into the part's manifest (`contract.MANIFEST`), so that a resumed run
maps shard N to the same input; a shard is finished when its `_stats.json` exists, exactly as for a
download, and a redone shard starts from nothing. Samples are recorded as downloaded ones are
(record.Recorder: the same Resizer, metadata columns and counts; `resizeMode: no` with
`skipReencode: true` keeps their bytes). A sample whose image does not decode is counted as a failure
with reason `decode`, its error message naming the file and sample; an input that cannot be read at
all raises an InputError naming the file and the sample: formats.BrokenShard for a broken tar,
ConvertError for a sample without an image, a JSONL line without its fields, a missing image file.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import pyarrow as pa
from PIL import Image

from ..contract import MANIFEST, ShardStats, fingerprint, sample_key
from ..errors import InputError
from ..spec import PartSpec
from ..storage import Store
from .columns import sample_filter
from .formats import ConvertError
from .image_header import header_size
from .record import KEY, OUTCOME, Recorder, clear_shard
from .selection import of_dataset
from .sources import Refused, samples_of

# The leading columns of every sample's metadata row (the shard's `.parquet`), whatever the input's
# own json held; record.OUTCOME follows them.
SOURCE = pa.schema(
    [KEY, ("caption", pa.string()), ("url", pa.string()), ("source_file", pa.string()), ("source_key", pa.string())]
)


def plan(spec: PartSpec, store: Store) -> dict:
    """List the input shards into the manifest, or reuse an earlier run's list (same fingerprint)."""
    fp = fingerprint(spec)
    try:  # a threshold on a column the dataset lacks fails the part before any shard runs
        of_dataset(spec)
    except InputError as err:
        raise ConvertError(str(err)) from err
    done = store.read_json(MANIFEST)
    if done is not None:
        if done.get("fingerprint") != fp:
            raise ConvertError(
                f"output {store.uri} holds shards of a different source or filter; use a new "
                "output.uri or remove the old output first"
            )
        return done
    inputs = samples_of(spec).list_inputs(spec)
    manifest = {"fingerprint": fp, "shards": len(inputs), "inputs": inputs}
    store.write_json(manifest, MANIFEST)
    return manifest


# --- writing one output shard ------------------------------------------------------------------


def below_minimum(spec: PartSpec, image: bytes) -> str | None:
    """filter.minWidth/minHeight against the image's real size, read from its header: a source of
    samples has no size columns for the filter to read first."""
    least = (spec.filter.min_width or 0, spec.filter.min_height or 0)
    if least == (0, 0):
        return None
    size = header_size(image)
    if size is None:
        try:  # other formats: Pillow's lazy open reads the header only
            with Image.open(io.BytesIO(image)) as img:
                size = img.size
        except Exception:  # noqa: BLE001 - not an image: the resizer counts it as decode
            return None
    if size[0] < least[0] or size[1] < least[1]:
        return f"{size[0]}x{size[1]}, under filter.minWidth x minHeight ({least[0]}x{least[1]})"
    return None


def convert_shard(
    spec: PartSpec, shard: int, report: Callable[[ShardStats], None] | None = None, report_every: float = 2.0
) -> ShardStats:
    """Convert input shard `shard` into output shard `shard`; returns its stats (also its _stats.json)."""
    store = Store(spec.output)
    clear_shard(store, shard)
    manifest = store.read_json(MANIFEST)
    if manifest is None:  # plan() wrote it before any shard ran: the output was changed under the part
        raise ConvertError(f"{store.url(MANIFEST)}: missing, so input shard {shard} is not known")
    entry = manifest["inputs"][shard]
    stats = ShardStats(shard=shard, start_time=time.time())
    source = samples_of(spec)
    # The source's own columns after the leading ones; a name the row already has keeps its meaning.
    taken = {*SOURCE.names, *(name for name, _ in OUTCOME), spec.download.compute_hash}
    opened = source.open_input(spec, entry)  # an archive's columns are known once it is open
    extra = [f for f in opened.columns if f.name not in taken]
    leading_schema = pa.schema([*SOURCE, *extra])
    recorder = Recorder(spec.download, store, stats, True, leading_schema, report=report, report_every=report_every)
    judge = sample_filter(spec)
    selected = of_dataset(spec)  # filter.dropDuplicates and filter.scores, over the dataset's embeddings
    try:
        for index, (sample, image) in enumerate(opened.samples):
            stats.count += 1
            key = sample_key(shard, index, spec.filter.samples_per_shard)
            url = sample.meta.get("url")
            leading = {
                "key": key,
                "caption": sample.caption,
                "url": url if isinstance(url, str) else None,
                "source_file": sample.file,
                "source_key": sample.key,
                **{f.name: sample.meta.get(f.name) for f in extra},
            }
            if isinstance(image, Refused):
                recorder.failed(leading, sample.caption, image.message, image.reason)
                continue
            small = below_minimum(spec, image)
            if small:
                recorder.failed(leading, sample.caption, f"{sample.file}: sample {sample.key}: {small}", "too_small")
                continue
            refused = judge(sample.meta) if judge else None
            if refused:
                recorder.failed(leading, sample.caption, f"{sample.file}: sample {sample.key}: {refused}", "filtered")
                continue
            left_out = selected.why(sample.key) if selected else None
            if left_out:
                where = f"{sample.file}: sample {sample.key}: {left_out[1]}"
                recorder.failed(leading, sample.caption, where, "filtered")
                continue
            recorder.image(leading, sample.caption, image, where=f"{sample.file}: sample {sample.key}: ")
        stats.left_out_by = dict(selected.counts) if selected else {}
    except BaseException:
        recorder.close()
        raise
    finally:
        opened.close()
    return recorder.finish()
