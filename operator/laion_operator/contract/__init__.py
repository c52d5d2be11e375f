"""The output folder's contract: where the pipeline meets the operator.

The pipeline (inside Ray) writes a part's output folder; the control plane (the operator) only reads
it. This module is the one place that names what is in it, so that neither side imports the other:

    <output>/
      00000.tar | 00000.parquet | 00000.tfrecord | 00000/   a shard in the part's outputFormat
                                                 (mds: 00000/ holds index.json and shard.00000.mds …)
      00000.parquet                                          every sample's metadata and status
      00000_stats.json                                       the shard is finished (written last)
      part_<id>_stats.csv | part_<id>.csv                    the annotations trainers read
      index.json                                             mds: every shard's MDS index merged
      part_<id>_summary.json                                 counts, failure reasons, durations, verified
      _laion/filter.json                                     the filter's manifest and fingerprint
      _laion/shards/00000.parquet                            the filtered rows of each shard
      _laion/progress.json                                   the part's progress, as it runs
      latents/00000/                                         a shard's image latents and text embeddings (MDS)
      latents/00000_stats.json                               that shard is encoded (written last)
      latents/index.json                                     MDS index over every shard (StreamingDataset)
      latents/_latents.json                                  models, shapes, dtypes, scaling of the latents
      embeddings/{img_emb,text_emb,metadata}/…_00000.*       CLIP embeddings, clip-retrieval's layout
      embeddings/00000_stats.json                            that shard is embedded (written last)

It also holds what the job tells the operator besides files: its exit codes, the phases of a part,
and the bounded set of failure reasons every count (summary, status, metrics) is keyed by.
"""

import enum
import hashlib
import json
import math
from collections.abc import Callable
from typing import Protocol

META_DIR = "_laion"
PROGRESS = f"{META_DIR}/progress.json"
MANIFEST = f"{META_DIR}/filter.json"
SHARDS_DIR = f"{META_DIR}/shards"
HEAL = f"{META_DIR}/heal.json"  # a heal's plan and how far it got (pipeline/heal.py)
HEAL_DIR = f"{META_DIR}/heal"  # each shard's earlier samples while the heal rewrites it

# streaming's index file name, in each shard's MDS folder and (merged) at the root of the output.
MDS_INDEX = "index.json"
# img2dataset's writers name shards with this many digits: 00000, 00001, …
SHARD_DIGITS = 5


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


def sample_key(shard: int, index: int, samples_per_shard: int) -> str:
    """A sample's key, as img2dataset writes it: the shard's number, then the sample's place in it
    zero-padded to the digits samplesPerShard needs (or the index's own, in a converted shard that
    holds more)."""
    digits = max(math.ceil(math.log10(max(samples_per_shard, 2))), len(str(index)))
    return f"{shard * 10**digits + index:0{digits + SHARD_DIGITS}d}"


def shard_input(shard: int) -> str:
    """The filtered rows a shard downloads."""
    return f"{SHARDS_DIR}/{shard_name(shard)}.parquet"


STATS_SUFFIX = "_stats.json"
SHARD_STATS_GLOB = "*" + STATS_SUFFIX


def shard_stats(shard: int) -> str:
    """Present only once every other file of the shard is complete."""
    return shard_name(shard) + STATS_SUFFIX


def shard_of_stats(file_name: str) -> int | None:
    """The shard whose stats file this is, or None for any other file."""
    head = file_name[: -len(STATS_SUFFIX)] if file_name.endswith(STATS_SUFFIX) else ""
    return int(head) if head.isdigit() else None


def shard_metadata(shard: int) -> str:
    """Every sample of the shard: its metadata row, key, status and failure reason."""
    return f"{shard_name(shard)}.parquet"


def mds_index(shard: int | None = None) -> str:
    """A shard's MDS index, or (no shard) the merged one a StreamingDataset reads the whole part from."""
    return MDS_INDEX if shard is None else f"{shard_name(shard)}/{MDS_INDEX}"


LATENTS_DIR = "latents"
LATENTS_INDEX = f"{LATENTS_DIR}/index.json"
LATENTS_MANIFEST = f"{LATENTS_DIR}/_latents.json"
# The MDS columns, named as micro_diffusion's precompute script names them, so that its
# StreamingLatentsDataset reads the output as it is: image latents as `latents_<resolution>`,
# text embeddings as `caption_latents`, both raw bytes of `saveDtype`.
CAPTION_LATENTS = "caption_latents"
LATENTS_IMAGE = "jpg"  # latents.saveImages: the encoded image bytes, in the column --save_images names


def image_latents_column(resolution: int) -> str:
    return f"latents_{resolution}"


def latents_shard(shard: int) -> str:
    """The MDS folder (index.json, shard.00000.mds, …) of one download shard's latents."""
    return f"{LATENTS_DIR}/{shard_name(shard)}"


def latents_stats(shard: int) -> str:
    """Present only once the shard's MDS folder is complete."""
    return f"{LATENTS_DIR}/{shard_name(shard)}_stats.json"


# clip-retrieval's layout (autofaiss and embedding-reader read it): img_emb/img_emb_<shard>.npy, …
EMBEDDINGS_DIR = "embeddings"
EMBEDDING_FILES = {"img_emb": "npy", "text_emb": "npy", "metadata": "parquet"}


def embeddings_file(kind: str, shard: int) -> str:
    return f"{EMBEDDINGS_DIR}/{kind}/{kind}_{shard_name(shard)}.{EMBEDDING_FILES[kind]}"


EMBEDDINGS_DUPLICATES = f"{EMBEDDINGS_DIR}/duplicates.parquet"  # embeddings.dedup's (pipeline/dedup.py)
EMBEDDINGS_INDEX = f"{EMBEDDINGS_DIR}/index"  # embeddings.index's FAISS indexes and id map (pipeline/index.py)


def embeddings_stats(shard: int) -> str:  # present only once the shard's three files are complete
    return f"{EMBEDDINGS_DIR}/{shard_name(shard)}_stats.json"


def stats_csv(part_id: str) -> str:
    """Shard path and sample count, one row a shard (webdataset, parquet, tfrecord; mds: a row per
    MDS shard file)."""
    return f"part_{part_id}_stats.csv"


def files_csv(part_id: str) -> str:
    """Image path and caption, one row an image (files)."""
    return f"part_{part_id}.csv"


# The output formats: their names, and of each the one thing the control plane reads, the name of
# its annotation file (a dataset's index lists it for every part, done or not). Everything else a
# format knows (its shard files, writer, readers, annotation rows, resume's pattern) is its module's,
# pipeline/formats/<name>.py, which formats/ imports by the names here. The registry is here, not in
# formats/, because the operator and the spec (the CRD's enum) must know the names without importing
# the pipeline. A new format is its module there and its line here.
OUTPUT_FORMATS: dict[str, Callable[[str], str]] = {
    "webdataset": stats_csv,
    "files": files_csv,
    "parquet": stats_csv,
    "tfrecord": stats_csv,
    "mds": stats_csv,
}


def annotations(part_id: str, output_format: str) -> str:
    return OUTPUT_FORMATS[output_format](part_id)


def summary(part_id: str) -> str:
    return f"part_{part_id}_summary.json"


# A LaionDataset's output holds one part folder per part (the seeds' data_dir layout) and an index
# of every part's annotation files, written by the operator:
#
#     <dataset output>/part_<id>/…        one part's output folder, as above
#     <dataset output>/dataset_index.json  {"parts": [{"partId", "output", "annotations", "phase", …}]}
#
# With spec.latents, each part entry also names its latents folder and the index holds the one
# manifest of the dataset's latents (`dataset_latents`), which every part's `_latents.json` matches:
# the loader reads the whole dataset from its root.
DATASET_INDEX = "dataset_index.json"


def part_dir(part_id: str) -> str:
    return f"part_{part_id}"


def part_latents(part_id: str) -> str:
    """A part's latents folder, relative to its dataset's root."""
    return f"{part_dir(part_id)}/{LATENTS_DIR}"


def dataset_latents(settings) -> dict:
    """The dataset index's `latents` section: the columns, dtype and models every part's latents share
    (a spec.Latents; shapes are each part's manifest's, known once encoded)."""
    return {
        "columns": {
            "images": {str(r): image_latents_column(r) for r in settings.sizes},
            "caption": CAPTION_LATENTS,
            **({"imageBytes": LATENTS_IMAGE} if settings.save_images else {}),
        },
        "resolutions": list(settings.sizes),
        "dtype": settings.save_dtype,
        "latentMode": settings.latent_mode,
        "seed": settings.seed,
        "preprocessing": "reduced-decode" if settings.reduced_decode else "torchvision",
        "vae": settings.vae,
        "vaeSubfolder": settings.vae_subfolder,
        "textEncoder": settings.text_encoder,
        "manifest": LATENTS_MANIFEST,
    }


class _Spec(Protocol):
    """A part spec as this module reads it (spec.PartSpec, which sits above this module)."""

    def to_dict(self) -> dict: ...


def fingerprint(spec: _Spec) -> str:
    """What decides the shards' content; a resumed run into the same output must see the same value."""
    data = spec.to_dict()
    key = {k: data.get(k) for k in ("source", "columns", "filter")}
    if "archives" in data["source"]:  # known by name, not by where they are: a new link file resumes
        where = ("urls", "pattern", "links", "headersSecret", "maxArchiveBytes")
        key["source"] = {"archives": {k: v for k, v in data["source"]["archives"].items() if k not in where}}
    key["additional"] = data["download"]["saveAdditionalColumns"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class ExitCode(enum.IntEnum):
    """How a part's job ends, which tells the operator what a retry can do."""

    OK = 0
    SHARDS_FAILED = 1  # a retry resumes the failed shards
    BAD_INPUT = 2  # spec, metadata or output unusable: a retry cannot help
    STORAGE_UNAVAILABLE = 3  # the output's storage did not answer for output.retrySeconds: a retry resumes


class Phase(str, enum.Enum):
    """A part's phase: the job writes the middle ones into progress.json, the operator the others."""

    PENDING = "Pending"  # submitted, the job has not reported yet
    QUEUED = "Queued"  # waiting for a slot (maxConcurrentParts)
    FILTERING = "Filtering"
    DOWNLOADING = "Downloading"
    CONVERTING = "Converting"  # a part whose source is a dataset: its shards are written again
    ANNOTATING = "Annotating"
    VERIFYING = "Verifying"  # every shard read back with its format's reader
    ENCODING = "Encoding"  # the latents stage
    EMBEDDING = "Embedding"  # the embeddings stage
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPING = "Stopping"  # deleted; its job is being stopped
    SUSPENDED = "Suspended"  # spec.suspend: its job is stopped, its finished shards kept until resumed

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def running(self) -> bool:
        return self in RUNNING


# A job has been submitted for the part and has not ended.
RUNNING = frozenset(
    {
        Phase.PENDING,
        Phase.FILTERING,
        Phase.DOWNLOADING,
        Phase.CONVERTING,
        Phase.ANNOTATING,
        Phase.VERIFYING,
        Phase.ENCODING,
        Phase.EMBEDDING,
    }
)
TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})
# No job runs and none will until the spec changes again: terminal, or suspended.
SETTLED = TERMINAL | {Phase.SUSPENDED}
PHASES = [p.value for p in Phase]

FAILURE_REASONS = [
    "http_4xx",
    "http_5xx",
    "timeout",
    "tls",
    "dns",
    "connection",
    "decode",
    "too_small",
    "aspect_ratio",
    "opt_out",
    "too_large",
    "blocked_address",
    "bad_url",
    "redirect",
    "rate_limited",
    "expired",  # an archive's signed link answered 403 for its expiry: a new link file fetches it
    "no_caption",  # an archive's image that its captions do not name
    "filtered",  # a source's sample whose own metadata fails spec.filter (punsafe, aesthetic, language …)
    "other",
]


# Which opt-out refused an `opt_out` sample, counted apart (ShardStats.opted_out_by): robots.txt, the
# X-Robots-Tag header, TDMRep's `tdm-reservation` header and TDMRep's /.well-known/tdmrep.json.
OPT_OUT_RULES = ["robots_txt", "x_robots_tag", "tdm_reservation", "tdmrep_json"]


# Failures worth fetching again later (a heal's default): the server or the network, not the image.
TRANSIENT_REASONS = [r for r in ("timeout", "dns", "connection", "http_5xx", "rate_limited") if r in FAILURE_REASONS]


def heal_backup(shard: int) -> str:
    return f"{HEAL_DIR}/{shard_name(shard)}.parquet"


def reason_of(reason: str) -> str:
    """The bounded value for a failure reason a job reported (an older or newer job's may differ)."""
    return reason if reason in FAILURE_REASONS else "other"


# The environment variable a part's Ray job finds its submission id in (Progress.job).
JOB_ID_ENV = "LAION_JOB_ID"


# The typed records (progress.json, a shard's stats), one import away as the names above are.
from .records import EncodeStats, LatentStats, PartCounts, Progress, ShardStats, Verification  # noqa: E402, F401
