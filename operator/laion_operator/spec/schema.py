"""The part spec's schema: the CRD's openAPIV3Schema is generated from `SCHEMA`, and it is the only
place a default is written. The enums and limits it names are here too."""

from __future__ import annotations

from typing import Any

from .. import contract
from ..contract import FAILURE_REASONS, TRANSIENT_REASONS

LOGICAL_COLUMNS = tuple("url caption width height aesthetic punsafe pwatermark similarity language hash".split())
RESIZE_MODES = ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
# The CRD's enum of outputFormat: the contract's registry of formats (one module each in pipeline/formats/).
OUTPUT_FORMATS = list(contract.OUTPUT_FORMATS)
# What `source.dataset` reads: img2dataset-style tars, a `files` folder, or images plus a captions JSONL.
DATASET_FORMATS = ["webdataset", "files", "images"]
# What `source.urls` reads: img2dataset's input formats (txt: one URL a line), each optionally compressed.
LIST_FORMATS = ["parquet", "csv", "tsv", "json", "jsonl", "txt"]
LIST_COMPRESSIONS = [".gz", ".bz2", ".xz", ".zst"]
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
# spec.stallSeconds' default: long enough for the quiet stretches of a healthy part (filtering a large
# metadata file publishes its counts only per batch), short enough that a hung job shows the same hour.
STALL_SECONDS = 900
# latents.dtype: what the models compute in; auto is bfloat16 on a GPU and float32 on a CPU.
MODEL_DTYPES = ["auto", "float32", "float16", "bfloat16"]
SAVE_DTYPES = ["float16", "float32"]
LATENT_MODES = ["mean", "sample"]
# latents.reducedDecode's bound against a whole decode, in dB PSNR of the preprocessed pixels. The
# worst measured: 33.9 on photo-like JPEGs (median 43.8), 30.2 on tests/pipeline/test_latents_recipe.py's
# harsher ones (hard 8-pixel edges and noise, odd sides), which hold it.
REDUCED_DECODE_PSNR = 28


def _str(description: str, **extra: Any) -> dict:
    return {"type": "string", "description": description, **extra}


def _num(description: str, **extra: Any) -> dict:
    return {"type": "number", "description": description, **extra}


def _int(description: str, **extra: Any) -> dict:
    return {"type": "integer", "description": description, **extra}


def _bool(description: str, default: bool) -> dict:
    return {"type": "boolean", "description": description, "default": default}


SCHEMA: dict = {
    "type": "object",
    "required": ["partId", "source", "output"],
    "properties": {
        "partId": _str(
            "Part identifier, used in annotation file names (part_<id>_stats.csv).",
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
            maxLength=63,
            **{
                "x-kubernetes-validations": [
                    {"rule": "self == oldSelf", "message": "partId is immutable: its files are named after it"}
                ]
            },
        ),
        "source": {
            "type": "object",
            "description": "What the part reads: metadata to download (urls) or a dataset to convert "
            "(dataset), exactly one of them.",
            # A CEL rule, not JSON Schema's oneOf, which would only say "not valid under any".
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.urls) != has(self.dataset)",
                    "message": "give exactly one of urls (metadata to download) "
                    "or dataset (an existing dataset to convert)",
                },
                {
                    "rule": "has(self.urls) || (!has(self.format) && !has(self.header))",
                    "message": "format and header describe the files of urls; a dataset has its own format",
                },
            ],
            "properties": {
                "urls": {
                    "type": "array",
                    "minItems": 1,
                    "description": "Metadata files (URL lists): local paths, http(s):// or s3:// URLs "
                    "(s3 uses output's endpoint options), in parquet, csv, tsv, json (an array of objects), "
                    "jsonl or txt (one URL a line), each optionally compressed ("
                    + ", ".join(LIST_COMPRESSIONS)
                    + "); the format is told by the name (e.g. x.tsv.gz) unless format is set, parquet when "
                    "no name matches.",
                    "items": {"type": "string", "minLength": 1},
                },
                "format": _str(
                    "The format of every file of urls, whatever its name (a compression suffix still "
                    "decompresses); unset: told by each file's name.",
                    enum=LIST_FORMATS,
                ),
                "header": {
                    "type": "array",
                    "minItems": 1,
                    "description": "csv and tsv files without a header line: their column names, in order "
                    "(CC12M's TSV: [url, caption]). Unset: the first line is the header.",
                    "items": {"type": "string", "minLength": 1},
                },
                "dataset": {
                    "type": "object",
                    "description": "An existing dataset, written again in download.outputFormat (resized as "
                    "download says; resizeMode no with skipReencode keeps the bytes).",
                    "required": ["uri"],
                    "properties": {
                        "uri": _str(
                            "Folder: local path or s3://bucket/prefix (s3 uses output's endpoint options).", minLength=1
                        ),
                        "format": _str(
                            "webdataset (NNNNN.tar of key.jpg/.txt/.json), files (NNNNN/ folders of "
                            "key.jpg/.txt/.json) or images (image files and a captions JSONL); unset: "
                            "detected.",
                            enum=DATASET_FORMATS,
                        ),
                        "captions": _str(
                            "images: the JSONL file, one object a line naming an image and its "
                            "caption (a path relative to uri, or absolute, or a URL).",
                            minLength=1,
                        ),
                        "imageField": _str(
                            "images: the JSONL field holding the image path, relative to uri.",
                            minLength=1,
                            default="img_path",
                        ),
                        "captionField": _str(
                            "images: the JSONL field holding the caption.", minLength=1, default="prompt"
                        ),
                    },
                },
            },
        },
        "columns": {
            "type": "object",
            "description": "Logical field -> column name in the file. Unset: detected from the known LAION variants.",
            "properties": {name: {"type": "string", "minLength": 1} for name in LOGICAL_COLUMNS},
        },
        "filter": {
            "type": "object",
            "default": {},
            "properties": {
                "minWidth": _int("Keep rows whose width is at least this.", minimum=0),
                "minHeight": _int("Keep rows whose height is at least this.", minimum=0),
                "maxPunsafe": _num("Keep rows whose punsafe is at most this.", minimum=0, maximum=1),
                "maxPwatermark": _num("Keep rows whose pwatermark is at most this.", minimum=0, maximum=1),
                "minAesthetic": _num("Keep rows whose aesthetic score is at least this.", minimum=0, maximum=10),
                "minSimilarity": _num("Keep rows whose CLIP similarity is at least this.", minimum=-1, maximum=1),
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
                "sampleFraction": _num(
                    "Keep this fraction of rows (a trial run), chosen by seed.",
                    minimum=0,
                    exclusiveMinimum=True,
                    maximum=1,
                    default=1.0,
                ),
                "seed": _int("Seed of the sample and the shuffle.", minimum=0, default=0),
                "dedupeUrls": _bool("Keep the first row of each URL only.", True),
                "shuffle": _bool("Shuffle the kept rows deterministically by seed.", True),
                "samplesPerShard": _int("Rows per download shard.", minimum=1, maximum=1000000, default=10000),
            },
        },
        "download": {
            "type": "object",
            "default": {},
            "properties": {
                "imageSize": _int("Target image side in pixels.", minimum=1, maximum=16384, default=256),
                "resizeMode": _str("How images are resized.", enum=RESIZE_MODES, default="border"),
                "resizeOnlyIfBigger": _bool("Never upscale.", False),
                "skipReencode": _bool("Keep the original bytes when no resize happens.", False),
                "downscaleInterpolation": _str(
                    "Resampling filter when shrinking.", enum=INTERPOLATIONS, default="area"
                ),
                "upscaleInterpolation": _str(
                    "Resampling filter when enlarging.", enum=INTERPOLATIONS, default="lanczos"
                ),
                "encodeFormat": _str("Image encoding.", enum=ENCODE_FORMATS, default="jpg"),
                # No schema default: it depends on encodeFormat (ENCODE_QUALITY), and the API server
                # would fill a JPEG quality into a PNG part.
                "encodeQuality": _int(
                    "JPEG/WebP quality (unset: 95), or PNG compression level 0-9 (unset: 9).", minimum=0, maximum=100
                ),
                "minImageSize": _int("Drop images whose smaller side is below this.", minimum=0, default=0),
                "maxAspectRatio": _num(
                    "Drop images whose aspect ratio exceeds this (unset: no limit).", minimum=0, exclusiveMinimum=True
                ),
                "outputFormat": _str(
                    "Dataset format; verify, heal and latents read every one of them.",
                    enum=OUTPUT_FORMATS,
                    default="webdataset",
                ),
                "mdsShardSizeLimit": _int(
                    "mds: bytes of an MDS shard file before the next one starts (streaming's size_limit).",
                    minimum=1024,
                    maximum=(1 << 32) - 1,
                    default=MDS_SHARD_SIZE,
                ),
                "timeout": _num(
                    "Seconds one attempt at an image may take end to end: DNS, connect, TLS, headers, "
                    "redirects and body.",
                    minimum=0,
                    exclusiveMinimum=True,
                    default=10,
                ),
                "retries": _int(
                    "Retries per image after a failure another attempt may fix (a timeout, a 5xx, "
                    "a dropped connection). 429 and 503 with Retry-After are waited for and retried "
                    "besides, within the image's (retries + 1) x timeout.",
                    minimum=0,
                    maximum=10,
                    default=0,
                ),
                "maxInFlight": _int(
                    "URLs each shard task fetches at once, on one event loop (bodies then go to the task's "
                    "decode threads). The default hides ~0.3-3 s of latency per image behind a CPU's worth of "
                    "decoding (bench/README.md); raise it for slow hosts or more CPUs per task.",
                    minimum=1,
                    maximum=4096,
                    default=MAX_IN_FLIGHT,
                ),
                "maxPerHost": _int(
                    "Connections (and URLs in flight) a shard task opens to one host at once. Only a host with "
                    "many URLs in a shard (a CDN, in practice) reaches it; the default is the least that kept "
                    "such a host from bounding a shard's time in the benchmark (bench/README.md). Each shard "
                    "task keeps its own count, so a host sees up to this many per task running; lower it for "
                    "a host of your own that cannot take that.",
                    minimum=1,
                    maximum=256,
                    default=MAX_PER_HOST,
                ),
                "maxRedirects": _int(
                    "Redirects followed per image; more, or a loop, fail as `redirect`.",
                    minimum=0,
                    maximum=30,
                    default=5,
                ),
                "maxImageBytes": _int(
                    "Largest body read: refused by Content-Length before reading, and reading stops past it "
                    "(`too_large`). With maxInFlight it bounds a task's memory for bodies being read "
                    "(fetched bodies waiting for a decode thread are bounded apart, to "
                    f"{DECODE_BACKLOG_BYTES >> 20} MiB a task).",
                    minimum=1024,
                    default=32 << 20,
                ),
                "maxImagePixels": _int(
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
                "respectRobotsTxt": _bool(
                    "Fetch each host's robots.txt (once per shard task) and skip the URLs it disallows for "
                    "userAgentToken (`opt_out`).",
                    False,
                ),
                "parallelism": _int(
                    "Shards downloaded at once (0: one per CPU of the Ray cluster).", minimum=0, default=0
                ),
                "shardRetries": _int("Times a failed shard is retried.", minimum=0, maximum=20, default=2),
                "userAgentToken": _str(
                    "Token added to the User-Agent, matched against X-Robots-Tag.", default="img2dataset"
                ),
                "disallowedHeaderDirectives": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "X-Robots-Tag directives that opt an image out.",
                    "default": ["noai", "noimageai", "noindex", "noimageindex"],
                },
                "saveAdditionalColumns": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Logical fields or file columns saved with each sample.",
                    "default": [],
                },
                "computeHash": _str(
                    "Hash of the downloaded bytes saved with each sample.", enum=HASHES, default="sha256"
                ),
                "verifyTls": _bool("Verify TLS certificates (false accepts broken certificate chains).", True),
                "reducedDecode": _bool(
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
                "uri": _str("Local path or s3://bucket/prefix.", minLength=1),
                "endpoint": _str("S3 endpoint URL (MinIO, OBS, GCS interop); unset: AWS."),
                "region": _str("S3 region."),
                "pathStyle": _bool("Path-style S3 addressing (MinIO).", False),
                "profile": _str("Named AWS profile holding the credentials (CLI)."),
                "credentialsSecret": _str(
                    "Kubernetes Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and optionally "
                    "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL) for the Ray job (operator)."
                ),
                "retrySeconds": _num(
                    "How long reads and writes of the output are retried while its storage does not answer; "
                    "longer, the job fails with reason StorageUnavailable and the next attempt resumes.",
                    minimum=0,
                    default=300,
                ),
            },
        },
        "latents": {
            "type": "object",
            "description": "Precompute VAE image latents and text-encoder embeddings of every downloaded sample, "
            "read back from its shard in any download.outputFormat (MDS under latents/, one Ray "
            "task per shard, on a GPU where the cluster has one).",
            "required": ["vae", "textEncoder"],
            "properties": {
                "vae": _str(
                    "diffusers AutoencoderKL: a local path, or a hub id found in the mounted cache "
                    "(or downloaded with hubDownload).",
                    minLength=1,
                ),
                "vaeSubfolder": _str("The VAE's folder inside `vae` (a whole pipeline's repository: vae)."),
                "textEncoder": _str(
                    "Text encoder: a transformers model (local path or hub id), or an open_clip model "
                    "as openclip:hf-hub:<repo> or openclip:<architecture>/<pretrained>.",
                    minLength=1,
                ),
                "textEncoderSubfolder": _str(
                    "The text encoder's folder inside `textEncoder` (a pipeline's: text_encoder)."
                ),
                "tokenizerSubfolder": _str(
                    "The tokenizer's folder inside `textEncoder` (a pipeline's: tokenizer; "
                    "unset: textEncoderSubfolder)."
                ),
                "resolution": _int(
                    "Images are resized (shorter side) and center-cropped to this square "
                    "(the one-item form of resolutions).",
                    minimum=8,
                    maximum=4096,
                    default=256,
                ),
                "resolutions": {
                    # A set: the API server refuses repeats (it forbids uniqueItems); validation.py's twin.
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 8,
                    "x-kubernetes-list-type": "set",
                    "items": {"type": "integer", "minimum": 8, "maximum": 4096},
                    "description": "Several squares from one decode (micro_diffusion's [256, 512]): one VAE pass "
                    "and one column latents_<r> each; set, it replaces resolution.",
                },
                "saveImages": _bool(
                    "Store each sample's image bytes too (column `jpg`, as micro_diffusion's --save_images).", False
                ),
                "reducedDecode": _bool(
                    "Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) before the bicubic resize: "
                    f"faster, pixels within {REDUCED_DECODE_PSNR} dB PSNR of the reference's whole decode "
                    "(false: torchvision's Resize(r, BICUBIC) + CenterCrop(r) on the whole image, as "
                    "micro_diffusion prepares its images).",
                    False,
                ),
                "batchSize": _int("Samples encoded at once.", minimum=1, maximum=4096, default=32),
                "decodeThreads": _int(
                    "Threads decoding images beside the model (0: the node's CPUs shared "
                    "among its GPUs on a GPU, one on a CPU).",
                    minimum=0,
                    maximum=256,
                    default=0,
                ),
                "dtype": _str(
                    "The models' compute dtype (auto: bfloat16 on a GPU, float32 on a CPU).",
                    enum=MODEL_DTYPES,
                    default="auto",
                ),
                "saveDtype": _str("The stored latents' and embeddings' dtype.", enum=SAVE_DTYPES, default="float16"),
                "latentMode": _str(
                    "Store the latent distribution's mean, or a sample drawn by seed and key.",
                    enum=LATENT_MODES,
                    default="sample",
                ),
                "seed": _int(
                    "Seed of the latent samples (each sample's noise depends on it and the key only).",
                    minimum=0,
                    default=0,
                ),
                "parallelism": _int(
                    "Shards encoded at once (0: one per GPU of the Ray cluster, or per CPU without).",
                    minimum=0,
                    default=0,
                ),
                "shardRetries": _int("Times a failed shard is retried.", minimum=0, maximum=20, default=2),
                "hubDownload": _bool(
                    "Let the stage download models named by hub id (false: local paths and the "
                    "mounted cache only, HF_HUB_OFFLINE=1).",
                    False,
                ),
                "hubTokenSecret": _str(
                    "Kubernetes Secret with HF_TOKEN, for gated models (operator); given to the Ray job like the "
                    "storage credentials, never in the spec or the entrypoint."
                ),
            },
        },
        "maxRetries": _int(
            "Times the operator resubmits a failed job, resuming from finished shards.",
            minimum=0,
            maximum=100,
            default=3,
        ),
        "verify": _bool(
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
                "round": _int("Raise it to heal again with the same reasons.", minimum=0, default=0),
            },
        },
        "suspend": _bool(
            "true stops the part's job and keeps its finished shards (phase Suspended); false "
            "resumes from them (Kueue's convention).",
            False,
        ),
        "priority": _int("Parts waiting for a slot run higher priority first, then oldest first.", default=0),
        "activeDeadlineSeconds": _int(
            "Seconds a part may run (from submission, reset on resume) before it fails "
            "with reason DeadlineExceeded; its finished shards stay.",
            minimum=1,
        ),
        "stallSeconds": _int(
            f"Seconds a running part's counts may stand still before it gets the condition "
            f"Stalled, a Warning Event and laion_part_stalled 1 (default {STALL_SECONDS}); the "
            "job keeps running.",
            minimum=1,
        ),
    },
}
