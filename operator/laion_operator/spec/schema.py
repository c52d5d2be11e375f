"""The part spec's schema: the CRD's openAPIV3Schema is generated from `SCHEMA`, and it is the only
place a default is written. The enums and limits it names are here too."""

from __future__ import annotations

from .. import contract
from ..contract import FAILURE_REASONS, TRANSIENT_REASONS
from .fields import boolean, integer, number, string
from .schema_latents import EMBEDDINGS, LATENTS, selection
from .schema_source import SOURCE

LOGICAL_COLUMNS = tuple("url caption width height aesthetic punsafe pwatermark similarity language hash".split())
RESIZE_MODES = ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
# The CRD's enum of outputFormat: the contract's registry of formats (one module each in pipeline/formats/).
OUTPUT_FORMATS = list(contract.OUTPUT_FORMATS)
MDS_SHARD_SIZE = 1 << 26  # streaming's own default size_limit
ENCODE_FORMATS = ["jpg", "png", "webp"]
HASHES = ["none", "md5", "sha256", "sha512"]
# encodeQuality when unset, by encodeFormat: img2dataset's JPEG/WebP quality, and PNG's top compression.
ENCODE_QUALITY = {"jpg": 95, "webp": 95, "png": 9}
PNG_MAX_COMPRESSION = 9
INTERPOLATIONS = ["nearest", "linear", "cubic", "area", "lanczos"]  # img2dataset's names, aliases aside
MAX_IN_FLIGHT = 128  # download.maxInFlight's default: measured in bench/README.md
# Fetched bodies waiting for a shard task's decode threads: about a deadline's worth of decoding
# (10 s × ~30 images/s per CPU × ~300 KB on LAION's mix) for a task of a few CPUs.
DECODE_BACKLOG_BYTES = 256 << 20
# download.maxPerHost's default, from the internet benchmark's sweep (bench/README.md): a host with a
# large share of a shard (a CDN) is fetched at maxPerHost / latency URLs a second, and below 16 that
# host's queue, not the CPU, was what a shard waited for.
MAX_PER_HOST = 16
HOST_BUDGETS = ["cluster", "task"]  # download.hostBudget: where maxPerHost is counted
# spec.stallSeconds' default: long enough for the quiet stretches of a healthy part (filtering a large
# metadata file publishes its counts only per batch), short enough that a hung job shows the same hour.
STALL_SECONDS = 900


SCHEMA: dict = {
    "type": "object",
    "required": ["partId", "source", "output"],
    "properties": {
        "partId": string(
            "Part identifier, used in annotation file names (part_<id>_stats.csv).",
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            maxLength=63,
            **{
                "x-kubernetes-validations": [
                    {"rule": "self == oldSelf", "message": "partId is immutable: its files are named after it"}
                ]
            },
        ),
        "source": SOURCE,
        "columns": {
            "type": "object",
            "description": "Logical field -> column name in the file. Unset: detected from the known LAION variants.",
            "properties": {name: {"type": "string", "minLength": 1} for name in LOGICAL_COLUMNS},
        },
        "filter": {
            "type": "object",
            "default": {},
            "properties": {
                "minWidth": integer("Keep rows whose width is at least this.", minimum=0),
                "minHeight": integer("Keep rows whose height is at least this.", minimum=0),
                "maxPunsafe": number("Keep rows whose punsafe is at most this.", minimum=0, maximum=1),
                "maxPwatermark": number("Keep rows whose pwatermark is at most this.", minimum=0, maximum=1),
                "minAesthetic": number("Keep rows whose aesthetic score is at least this.", minimum=0, maximum=10),
                "minSimilarity": number("Keep rows whose CLIP similarity is at least this.", minimum=-1, maximum=1),
                "languages": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "description": "Keep rows whose language is one of these.",
                },
                "exclude": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "description": "Removal lists: URLs or their SHA-256 that are never fetched (takedowns, opt-out "
                    "registries, a Re-LAION diff). Each a local path, http(s):// or s3:// URL of a "
                    ".parquet or .csv file (a url and/or url_sha256 column) or a text file (one URL "
                    "or 64-hex-digit SHA-256 a line); .gz and other compressions by name. Matching "
                    "rows count as droppedBy.excluded.",
                },
                "sampleFraction": number(
                    "Keep this fraction of rows (a trial run), chosen by seed.",
                    minimum=0,
                    exclusiveMinimum=True,
                    maximum=1,
                    default=1.0,
                ),
                "seed": integer("Seed of the sample and the shuffle.", minimum=0, default=0),
                "dedupeUrls": boolean("Keep the first row of each URL only.", True),
                "shuffle": boolean("Shuffle the kept rows deterministically by seed.", True),
                "samplesPerShard": integer("Rows per download shard.", minimum=1, maximum=1000000, default=10000),
                **selection("the dataset a part converts (source.dataset)", None),
            },
        },
        "download": {
            "type": "object",
            "default": {},
            "properties": {
                "imageSize": integer("Target image side in pixels.", minimum=1, maximum=16384, default=256),
                "resizeMode": string("How images are resized.", enum=RESIZE_MODES, default="border"),
                "resizeOnlyIfBigger": boolean("Never upscale.", False),
                "skipReencode": boolean("Keep the original bytes when no resize happens.", False),
                "downscaleInterpolation": string(
                    "Resampling filter when shrinking.", enum=INTERPOLATIONS, default="area"
                ),
                "upscaleInterpolation": string(
                    "Resampling filter when enlarging.", enum=INTERPOLATIONS, default="lanczos"
                ),
                "encodeFormat": string("Image encoding.", enum=ENCODE_FORMATS, default="jpg"),
                # No schema default: it depends on encodeFormat (ENCODE_QUALITY), and the API server
                # would fill a JPEG quality into a PNG part.
                "encodeQuality": integer(
                    "JPEG/WebP quality (unset: 95), or PNG compression level 0-9 (unset: 9).", minimum=0, maximum=100
                ),
                "minImageSize": integer("Drop images whose smaller side is below this.", minimum=0, default=0),
                "maxAspectRatio": number(
                    "Drop images whose aspect ratio exceeds this (unset: no limit).", minimum=0, exclusiveMinimum=True
                ),
                "outputFormat": string(
                    "Dataset format; verify, heal and latents read every one of them.",
                    enum=OUTPUT_FORMATS,
                    default="webdataset",
                ),
                "mdsShardSizeLimit": integer(
                    "mds: bytes of an MDS shard file before the next one starts (streaming's size_limit).",
                    minimum=1024,
                    maximum=(1 << 32) - 1,
                    default=MDS_SHARD_SIZE,
                ),
                "timeout": number(
                    "Seconds one attempt at an image may take to its response's headers (DNS, connect, TLS, "
                    "redirects), and to its whole body unless the body keeps minBodyRate. Also the window "
                    "minBodyRate is measured over, and robots.txt's and tdmrep.json's deadline.",
                    minimum=0,
                    exclusiveMinimum=True,
                    default=10,
                ),
                "minBodyRate": number(
                    "Bytes per second an image's body must keep up, over every `timeout` seconds from its "
                    "request (curl's low-speed limit): slower, it fails as `timeout`. An attempt whose body "
                    "has size S (its Content-Length, else maxImageBytes) is given at most timeout + S / "
                    "minBodyRate, so a large image served slowly but steadily is kept, and a drip-fed one "
                    "still ends at `timeout`.",
                    minimum=1,
                    default=16384,
                ),
                "retries": integer(
                    "Retries per image after a failure another attempt may fix (a timeout, a 5xx, "
                    "a dropped connection). 429 and 503 with Retry-After are waited for and retried "
                    "besides, within the image's (retries + 1) x timeout.",
                    minimum=0,
                    maximum=10,
                    default=0,
                ),
                "maxInFlight": integer(
                    "URLs each shard task fetches at once, on one event loop (bodies then go to the task's "
                    "decode threads). The default hides ~0.3-3 s of latency per image behind a CPU's worth of "
                    "decoding (bench/README.md); raise it for slow hosts or more CPUs per task.",
                    minimum=1,
                    maximum=4096,
                    default=MAX_IN_FLIGHT,
                ),
                "maxPerHost": integer(
                    "Connections (and URLs in flight) to one host at once: across every shard task of every "
                    "part on the Ray cluster with hostBudget cluster, per shard task with hostBudget task. "
                    "A host that answers 429 (or 503 with Retry-After) has this limit halved for the whole "
                    "cluster, down to 1, and regained by one a second while it answers without one; every "
                    "task waits out its Retry-After. The default is the least that kept a host with many URLs "
                    "in a shard from bounding the shard's time in the benchmark (bench/README.md).",
                    minimum=1,
                    maximum=256,
                    default=MAX_PER_HOST,
                ),
                "maxPerHostPerTask": integer(
                    "The most of maxPerHost one shard task holds of a host (the connections it opens to "
                    "it); while other tasks wait for the host, each holds an even share.",
                    minimum=1,
                    maximum=256,
                    default=MAX_PER_HOST,
                ),
                "hostBudget": string(
                    "Where maxPerHost is counted: `cluster`, one budget per host shared by every part's "
                    "shard tasks on the Ray cluster (leased in batches from a few actors in the namespace "
                    "laion-operator); `task`, each shard task on its own (runs without a shared cluster). "
                    "Fetches outside Ray always count per task.",
                    enum=HOST_BUDGETS,
                    default="cluster",
                ),
                "maxRedirects": integer(
                    "Redirects followed per image; more, or a loop, fail as `redirect`.",
                    minimum=0,
                    maximum=30,
                    default=5,
                ),
                "maxImageBytes": integer(
                    "Largest body read: refused by Content-Length before reading, and reading stops past it "
                    "(`too_large`). With maxInFlight it bounds a task's memory for bodies being read "
                    "(fetched bodies waiting for a decode thread are bounded apart, to "
                    f"{DECODE_BACKLOG_BYTES >> 20} MiB a task).",
                    minimum=1024,
                    default=32 << 20,
                ),
                "maxImagePixels": integer(
                    "Largest image decoded, in pixels its header declares; larger ones fail as `too_large` "
                    "before decoding (default: Pillow's decompression-bomb limit, ~0.25 GiB of RGB).",
                    minimum=1,
                    default=89_478_485,
                ),
                "allowedNetworks": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "description": "CIDRs a download may connect to besides public addresses (e.g. an on-premise "
                    "mirror, or 127.0.0.0/8 for a test bed). Loopback, private, link-local (cloud "
                    "metadata), shared, multicast and reserved addresses are refused otherwise "
                    "(`blocked_address`), checked after DNS and on every redirect.",
                    "default": [],
                },
                "dnsServers": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "description": "DNS servers to resolve image hosts with (IP or IP:port), instead of the node's "
                    "resolver. Answers are cached per shard task either way.",
                    "default": [],
                },
                "respectRobotsTxt": boolean(
                    "Fetch each host's robots.txt (once per shard task) and skip the URLs it disallows for "
                    "userAgentToken (`opt_out`).",
                    False,
                ),
                "parallelism": integer(
                    "Shards downloaded at once (0: one per CPU of the Ray cluster).", minimum=0, default=0
                ),
                "shardRetries": integer("Times a failed shard is retried.", minimum=0, maximum=20, default=2),
                "userAgentToken": string(
                    "Token added to the User-Agent, matched against robots.txt and X-Robots-Tag.",
                    default="img2dataset",
                ),
                "userAgent": string(
                    "The whole User-Agent header (unset: laion-operator/<version> (+<the project's URL>; "
                    "compatible; <userAgentToken>), naming the crawler honestly)."
                ),
                "disallowedHeaderDirectives": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "X-Robots-Tag directives that opt an image out (`opt_out`, rule x_robots_tag).",
                    "default": ["noai", "noimageai", "noml", "noindex", "noimageindex"],
                },
                "respectTdmRep": boolean(
                    "Honour the W3C TDM Reservation Protocol: an image whose response says "
                    "`tdm-reservation: 1` (rule tdm_reservation), or whose path the host's "
                    "/.well-known/tdmrep.json reserves (rule tdmrep_json; fetched once per host and shard "
                    "task beside the first image, under `timeout` and 64 KiB), is refused as `opt_out`.",
                    True,
                ),
                "saveAdditionalColumns": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Logical fields or file columns saved with each sample.",
                    "default": [],
                },
                "computeHash": string(
                    "Hash of the downloaded bytes saved with each sample.", enum=HASHES, default="sha256"
                ),
                "verifyTls": boolean("Verify TLS certificates (false accepts broken certificate chains).", True),
                "reducedDecode": boolean(
                    "Decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) when the target is at most half the "
                    "source: faster, output within 35 dB PSNR of a full decode; sizes and checks use the original.",
                    False,
                ),
            },
            "x-kubernetes-validations": [
                {
                    # For PNG the quality is OpenCV's compression level.
                    "rule": f"!has(self.encodeQuality) || self.encodeFormat != 'png' || "
                    f"self.encodeQuality <= {PNG_MAX_COMPRESSION}",
                    "message": f"encodeQuality must be at most {PNG_MAX_COMPRESSION} when encodeFormat is png "
                    "(the PNG compression level)",
                }
            ],
        },
        "output": {
            "type": "object",
            "required": ["uri"],
            "properties": {
                "uri": string("Local path or s3://bucket/prefix.", minLength=1),
                "endpoint": string("S3 endpoint URL (MinIO, OBS, GCS interop); unset: AWS."),
                "region": string("S3 region."),
                "pathStyle": boolean("Path-style S3 addressing (MinIO).", False),
                "profile": string("Named AWS profile holding the credentials (CLI)."),
                "credentialsSecret": string(
                    "Kubernetes Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and optionally "
                    "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL) for the Ray job (operator)."
                ),
                "retrySeconds": number(
                    "How long reads and writes of the output are retried while its storage does not answer; "
                    "longer, the job fails with reason StorageUnavailable and the next attempt resumes.",
                    minimum=0,
                    default=300,
                ),
            },
        },
        "latents": LATENTS,
        "embeddings": EMBEDDINGS,
        "maxRetries": integer(
            "Times the operator resubmits a failed job, resuming from finished shards.",
            minimum=0,
            maximum=100,
            default=3,
        ),
        "verify": boolean(
            "After annotating, read every shard back with its format's own reader and decode every "
            "image; a count that disagrees with the annotations or the summary fails the part.",
            True,
        ),
        "heal": {
            "type": "object",
            "description": "Fetch again the samples of the finished part that failed for these reasons, rewriting "
            "their shards (`laion-operator heal`); setting or changing it starts a heal job.",
            "properties": {
                "reasons": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "enum": FAILURE_REASONS},
                    "description": "Failure reasons to fetch again.",
                    "default": TRANSIENT_REASONS,
                },
                "round": integer("Raise it to heal again with the same reasons.", minimum=0, default=0),
            },
        },
        "suspend": boolean(
            "true stops the part's job and keeps its finished shards (phase Suspended); false "
            "resumes from them (Kueue's convention).",
            False,
        ),
        "priority": integer("Parts waiting for a slot run higher priority first, then oldest first.", default=0),
        "activeDeadlineSeconds": integer(
            "Seconds a part may run (from submission, reset on resume) before it fails "
            "with reason DeadlineExceeded; its finished shards stay.",
            minimum=1,
        ),
        "stallSeconds": integer(
            f"Seconds a running part's counts may stand still before it gets the condition "
            f"Stalled, a Warning Event and laion_part_stalled 1 (default {STALL_SECONDS}); the "
            "job keeps running.",
            minimum=1,
        ),
    },
}
