"""The part spec: one model for the CLI's YAML and the LaionPart custom resource's `spec`.

`SCHEMA` is the single source: the CRD's openAPIV3Schema is generated from it (`laion-operator crd`),
the CLI validates against it with the same messages, and its defaults are applied the way the
Kubernetes API server applies them, so a part behaves the same whichever way it arrives.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

from .contract import FAILURE_REASONS, TRANSIENT_REASONS, InputError, part_dir

LOGICAL_COLUMNS = (
    "url", "caption", "width", "height", "aesthetic", "punsafe", "pwatermark", "similarity", "language", "hash",
)
RESIZE_MODES = ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
OUTPUT_FORMATS = ["webdataset", "files", "parquet", "tfrecord", "mds"]
# What `source.dataset` reads: img2dataset-style tars, a `files` folder, or images plus a captions JSONL.
DATASET_FORMATS = ["webdataset", "files", "images"]
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
# latents.dtype: what the models compute in; auto is bfloat16 on a GPU and float32 on a CPU.
# spec.stallSeconds' default: long enough for the quiet stretches of a healthy part (filtering a large
# metadata file publishes its counts only per batch), short enough that a hung job shows the same hour.
STALL_SECONDS = 900
MODEL_DTYPES = ["auto", "float32", "float16", "bfloat16"]
SAVE_DTYPES = ["float16", "float32"]
LATENT_MODES = ["mean", "sample"]
LATENTS_FORMATS = ["webdataset", "parquet", "files"]  # the outputFormats pipeline/latents.py reads


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
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", maxLength=63,
            **{"x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "partId is immutable: its files are named after it"}]},
        ),
        "source": {
            "type": "object",
            "description": "What the part reads: parquet metadata to download (urls) or a dataset to convert "
                           "(dataset), exactly one of them.",
            # A CEL rule, not JSON Schema's oneOf, which would only say "not valid under any".
            "x-kubernetes-validations": [{"rule": "has(self.urls) != has(self.dataset)",
                                          "message": "give exactly one of urls (parquet metadata to download) "
                                                     "or dataset (an existing dataset to convert)"}],
            "properties": {
                "urls": {
                    "type": "array", "minItems": 1,
                    "description": "Parquet files: local paths, http(s):// or s3:// URLs (s3 uses output's endpoint options).",
                    "items": {"type": "string", "minLength": 1},
                },
                "dataset": {
                    "type": "object",
                    "description": "An existing dataset, written again in download.outputFormat (resized as "
                                   "download says; resizeMode no with skipReencode keeps the bytes).",
                    "required": ["uri"],
                    "properties": {
                        "uri": _str("Folder: local path or s3://bucket/prefix (s3 uses output's endpoint options).",
                                    minLength=1),
                        "format": _str("webdataset (NNNNN.tar of key.jpg/.txt/.json), files (NNNNN/ folders of "
                                       "key.jpg/.txt/.json) or images (image files and a captions JSONL); unset: "
                                       "detected.", enum=DATASET_FORMATS),
                        "captions": _str("images: the JSONL file, one object a line naming an image and its "
                                         "caption (a path relative to uri, or absolute, or a URL).", minLength=1),
                        "imageField": _str("images: the JSONL field holding the image path, relative to uri.",
                                           minLength=1, default="img_path"),
                        "captionField": _str("images: the JSONL field holding the caption.", minLength=1,
                                             default="prompt"),
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
                    "type": "array", "items": {"type": "string", "minLength": 1},
                    "description": "Keep rows whose language is one of these.",
                },
                "exclude": {
                    "type": "array", "items": {"type": "string", "minLength": 1},
                    "description": "Removal lists: URLs or their SHA-256 that are never fetched (takedowns, opt-out "
                                   "registries, a Re-LAION diff). Each a local path, http(s):// or s3:// URL of a "
                                   ".parquet or .csv file (a url and/or url_sha256 column) or a text file (one URL "
                                   "or 64-hex-digit SHA-256 a line); .gz and other compressions by name. Matching "
                                   "rows count as droppedBy.excluded.",
                },
                "sampleFraction": _num("Keep this fraction of rows (a trial run), chosen by seed.",
                                       minimum=0, exclusiveMinimum=True, maximum=1, default=1.0),
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
                "downscaleInterpolation": _str("Resampling filter when shrinking.", enum=INTERPOLATIONS,
                                               default="area"),
                "upscaleInterpolation": _str("Resampling filter when enlarging.", enum=INTERPOLATIONS,
                                             default="lanczos"),
                "encodeFormat": _str("Image encoding.", enum=ENCODE_FORMATS, default="jpg"),
                # No schema default: it depends on encodeFormat (ENCODE_QUALITY), and the API server
                # would fill a JPEG quality into a PNG part.
                "encodeQuality": _int("JPEG/WebP quality (unset: 95), or PNG compression level 0-9 (unset: 9).",
                                      minimum=0, maximum=100),
                "minImageSize": _int("Drop images whose smaller side is below this.", minimum=0, default=0),
                "maxAspectRatio": _num("Drop images whose aspect ratio exceeds this (unset: no limit).",
                                       minimum=0, exclusiveMinimum=True),
                "outputFormat": _str("Dataset format.", enum=OUTPUT_FORMATS, default="webdataset"),
                "mdsShardSizeLimit": _int("mds: bytes of an MDS shard file before the next one starts "
                                          "(streaming's size_limit).", minimum=1024, maximum=(1 << 32) - 1,
                                          default=MDS_SHARD_SIZE),
                "timeout": _num("Seconds one attempt at an image may take end to end: DNS, connect, TLS, headers, "
                                "redirects and body.", minimum=0, exclusiveMinimum=True, default=10),
                "retries": _int("Retries per image after a failure another attempt may fix (a timeout, a 5xx, "
                                "a dropped connection). 429 and 503 with Retry-After are waited for and retried "
                                "besides, within the image's (retries + 1) x timeout.",
                                minimum=0, maximum=10, default=0),
                "maxInFlight": _int(
                    "URLs each shard task fetches at once, on one event loop (bodies then go to the task's "
                    "decode threads). The default hides ~0.3-3 s of latency per image behind a CPU's worth of "
                    "decoding (bench/README.md); raise it for slow hosts or more CPUs per task.",
                    minimum=1, maximum=4096, default=MAX_IN_FLIGHT),
                "maxPerHost": _int(
                    "Connections (and URLs in flight) a shard task opens to one host at once. Only a host with "
                    "many URLs in a shard (a CDN, in practice) reaches it; the default is the least that kept "
                    "such a host from bounding a shard's time in the benchmark (bench/README.md). Each shard "
                    "task keeps its own count, so a host sees up to this many per task running; lower it for "
                    "a host of your own that cannot take that.",
                    minimum=1, maximum=256, default=MAX_PER_HOST),
                "maxRedirects": _int("Redirects followed per image; more, or a loop, fail as `redirect`.",
                                     minimum=0, maximum=30, default=5),
                "maxImageBytes": _int(
                    "Largest body read: refused by Content-Length before reading, and reading stops past it "
                    "(`too_large`). With maxInFlight it bounds a task's memory for bodies being read "
                    "(fetched bodies waiting for a decode thread are bounded apart, to "
                    f"{DECODE_BACKLOG_BYTES >> 20} MiB a task).",
                    minimum=1024, default=32 << 20),
                "maxImagePixels": _int(
                    "Largest image decoded, in pixels its header declares; larger ones fail as `too_large` "
                    "before decoding (default: Pillow's decompression-bomb limit, ~0.25 GiB of RGB).",
                    minimum=1, default=89_478_485),
                "allowedNetworks": {
                    "type": "array", "items": {"type": "string", "minLength": 1},
                    "description": "CIDRs a download may connect to besides public addresses (e.g. an on-premise "
                                   "mirror, or 127.0.0.0/8 for a test bed). Loopback, private, link-local (cloud "
                                   "metadata), shared, multicast and reserved addresses are refused otherwise "
                                   "(`blocked_address`), checked after DNS and on every redirect.",
                    "default": [],
                },
                "dnsServers": {
                    "type": "array", "items": {"type": "string", "minLength": 1},
                    "description": "DNS servers to resolve image hosts with (IP or IP:port), instead of the node's "
                                   "resolver. Answers are cached per shard task either way.",
                    "default": [],
                },
                "respectRobotsTxt": _bool(
                    "Fetch each host's robots.txt (once per shard task) and skip the URLs it disallows for "
                    "userAgentToken (`opt_out`).", False),
                "parallelism": _int("Shards downloaded at once (0: one per CPU of the Ray cluster).", minimum=0,
                                    default=0),
                "shardRetries": _int("Times a failed shard is retried.", minimum=0, maximum=20, default=2),
                "userAgentToken": _str("Token added to the User-Agent, matched against X-Robots-Tag.",
                                       default="img2dataset"),
                "disallowedHeaderDirectives": {
                    "type": "array", "items": {"type": "string"},
                    "description": "X-Robots-Tag directives that opt an image out.",
                    "default": ["noai", "noimageai", "noindex", "noimageindex"],
                },
                "saveAdditionalColumns": {
                    "type": "array", "items": {"type": "string"},
                    "description": "Logical fields or file columns saved with each sample.",
                    "default": [],
                },
                "computeHash": _str("Hash of the downloaded bytes saved with each sample.", enum=HASHES,
                                    default="sha256"),
                "verifyTls": _bool("Verify TLS certificates (false accepts broken certificate chains).", True),
                "reducedDecode": _bool(
                    "Decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) when the target is at most half the "
                    "source: faster, output within 35 dB PSNR of a full decode; sizes and checks use the original.",
                    False),
            },
            "x-kubernetes-validations": [{
                # For PNG the quality is OpenCV's compression level.
                "rule": f"!has(self.encodeQuality) || self.encodeFormat != 'png' || "
                        f"self.encodeQuality <= {PNG_MAX_COMPRESSION}",
                "message": f"encodeQuality must be at most {PNG_MAX_COMPRESSION} when encodeFormat is png "
                           "(the PNG compression level)",
            }],
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
                    "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL) for the Ray job (operator)."),
                "retrySeconds": _num(
                    "How long reads and writes of the output are retried while its storage does not answer; "
                    "longer, the job fails with reason StorageUnavailable and the next attempt resumes.",
                    minimum=0, default=300),
            },
        },
        "latents": {
            "type": "object",
            "description": "Precompute VAE image latents and text-encoder embeddings of every downloaded sample "
                           "(MDS under latents/, one Ray task per shard, on a GPU where the cluster has one).",
            "required": ["vae", "textEncoder"],
            "properties": {
                "vae": _str("diffusers AutoencoderKL: a local path, or a hub id found in the mounted cache "
                            "(or downloaded with hubDownload).", minLength=1),
                "vaeSubfolder": _str("The VAE's folder inside `vae` (a whole pipeline's repository: vae)."),
                "textEncoder": _str("Text encoder: a transformers model (local path or hub id), or an open_clip model "
                                    "as openclip:hf-hub:<repo> or openclip:<architecture>/<pretrained>.",
                                    minLength=1),
                "textEncoderSubfolder": _str("The text encoder's folder inside `textEncoder` (a pipeline's: "
                                             "text_encoder)."),
                "tokenizerSubfolder": _str("The tokenizer's folder inside `textEncoder` (a pipeline's: tokenizer; "
                                           "unset: textEncoderSubfolder)."),
                "resolution": _int("Images are resized (shorter side) and center-cropped to this square.",
                                   minimum=8, maximum=4096, default=256),
                "batchSize": _int("Samples encoded at once.", minimum=1, maximum=4096, default=32),
                "dtype": _str("The models' compute dtype (auto: bfloat16 on a GPU, float32 on a CPU).",
                              enum=MODEL_DTYPES, default="auto"),
                "saveDtype": _str("The stored latents' and embeddings' dtype.", enum=SAVE_DTYPES, default="float16"),
                "latentMode": _str("Store the latent distribution's mean, or a sample drawn by seed and key.",
                                   enum=LATENT_MODES, default="sample"),
                "seed": _int("Seed of the latent samples (each sample's noise depends on it and the key only).",
                             minimum=0, default=0),
                "parallelism": _int("Shards encoded at once (0: one per GPU of the Ray cluster, or per CPU without).",
                                    minimum=0, default=0),
                "shardRetries": _int("Times a failed shard is retried.", minimum=0, maximum=20, default=2),
                "hubDownload": _bool("Let the stage download models named by hub id (false: local paths and the "
                                     "mounted cache only, HF_HUB_OFFLINE=1).", False),
                "hubTokenSecret": _str(
                    "Kubernetes Secret with HF_TOKEN, for gated models (operator); given to the Ray job like the "
                    "storage credentials, never in the spec or the entrypoint."),
            },
        },
        "maxRetries": _int("Times the operator resubmits a failed job, resuming from finished shards.",
                           minimum=0, maximum=100, default=3),
        "verify": _bool("After annotating, read every shard back with its format's own reader and decode every "
                        "image; a count that disagrees with the annotations or the summary fails the part.", True),
        "heal": {
            "type": "object",
            "description": "Fetch again the samples of the finished part that failed for these reasons, rewriting "
                           "their shards (`laion-operator heal`); setting or changing it starts a heal job.",
            "properties": {
                "reasons": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": FAILURE_REASONS},
                            "description": "Failure reasons to fetch again.", "default": TRANSIENT_REASONS},
                "round": _int("Raise it to heal again with the same reasons.", minimum=0, default=0),
            },
        },
        "suspend": _bool("true stops the part's job and keeps its finished shards (phase Suspended); false "
                         "resumes from them (Kueue's convention).", False),
        "priority": _int("Parts waiting for a slot run higher priority first, then oldest first.", default=0),
        "activeDeadlineSeconds": _int("Seconds a part may run (from submission, reset on resume) before it fails "
                                      "with reason DeadlineExceeded; its finished shards stay.", minimum=1),
        "stallSeconds": _int(f"Seconds a running part's counts may stand still before it gets the condition "
                             f"Stalled, a Warning Event and laion_part_stalled 1 (default {STALL_SECONDS}); the "
                             "job keeps running.", minimum=1),
    },
}


# --- cross-field rules ----------------------------------------------------------------------------
# The CRD carries them as CEL (`x-kubernetes-validations`, evaluated by the API server); the CLI and
# the operator evaluate the same rules through the Python twin registered here under the rule's
# CEL text, and report the same message at the same field. A CEL library is not a dependency of the
# shared core (the ones on PyPI bring native regex and date libraries or a CLI along); instead
# tests/test_cel.py evaluates every rule with both a real CEL implementation and its twin on the
# same objects, so the two cannot drift apart.

def _has(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and obj.get(key) is not None


RULES: dict[str, Callable[[Any, Any], bool]] = {
    "self == oldSelf": lambda self, old: self == old,
    "has(self.urls) != has(self.pattern)": lambda self, old: _has(self, "urls") != _has(self, "pattern"),
    "has(self.urls) != has(self.dataset)": lambda self, old: _has(self, "urls") != _has(self, "dataset"),
    "!has(self.pattern) || (self.pattern.contains('{part}') && has(self.first) && has(self.last))":
        lambda self, old: not _has(self, "pattern") or (
            "{part}" in self["pattern"] and _has(self, "first") and _has(self, "last")),
    "!has(self.first) || !has(self.last) || self.first <= self.last":
        lambda self, old: not _has(self, "first") or not _has(self, "last") or self["first"] <= self["last"],
    f"!has(self.first) || !has(self.last) || self.last - self.first < {1000}":
        lambda self, old: not _has(self, "first") or not _has(self, "last") or self["last"] - self["first"] < 1000,
    f"!has(self.encodeQuality) || self.encodeFormat != 'png' || self.encodeQuality <= {PNG_MAX_COMPRESSION}":
        lambda self, old: (not _has(self, "encodeQuality") or self.get("encodeFormat") != "png"
                           or self["encodeQuality"] <= PNG_MAX_COMPRESSION),
}


def rule_errors(value: Any, schema: dict, old: Any = None, path: str = "spec") -> list[str]:
    """Every failing `x-kubernetes-validations` rule under `schema`, as "field: message".

    As the API server: a rule runs only where its value is present, and a transition rule (one that
    reads oldSelf) only where an old value exists too."""
    errors: list[str] = []
    if value is None:
        return errors
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        if not RULES[rule["rule"]](value, old):
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += rule_errors(value[name], sub, old.get(name) if isinstance(old, dict) else None,
                                      f"{path}.{name}")
    return errors


class SpecError(InputError):
    """A part spec that cannot run; the message names the field and what is allowed."""


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(["spec", *[str(p) for p in error.absolute_path]])
    if error.validator == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"{path}: {error.instance!r} is not one of the allowed values: {allowed}"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"{path}.{missing}: required field is missing"
    if error.validator == "additionalProperties":
        known = ", ".join(sorted(error.schema.get("properties", {})))
        return f"{path}: {error.message}; known fields: {known}"
    return f"{path}: {error.message}"


def _closed(schema: dict) -> dict:
    """The schema with unknown fields refused, as the API server prunes them silently."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
            stack.extend(node["properties"].values())
        if node.get("type") == "array":
            stack.append(node["items"])
    return schema


# OpenAPI v3.0, the CRD's dialect, is JSON Schema draft 4 (boolean exclusiveMinimum and all).
_VALIDATOR = jsonschema.Draft4Validator(_closed(SCHEMA))


def apply_defaults(data: dict, schema: dict = SCHEMA) -> dict:
    """Fill defaults as the API server does for structural schemas (objects first, then their fields)."""
    out = copy.deepcopy(data)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if isinstance(out.get(name), dict) and sub.get("type") == "object":
            out[name] = apply_defaults(out[name], sub)
    return out


def validate(data: Any) -> dict:
    """Validate a raw spec, return it with defaults applied; raise SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
    messages = [_describe(e) for e in errors]
    if messages:
        raise SpecError("invalid part spec:\n  " + "\n  ".join(messages))
    spec = apply_defaults(data)
    errors = rule_errors(spec, SCHEMA)  # after defaulting, as the API server evaluates them
    if errors:
        raise SpecError("invalid part spec:\n  " + "\n  ".join(errors))
    download = spec["download"]
    download.setdefault("encodeQuality", ENCODE_QUALITY[download["encodeFormat"]])
    problems = [f"spec.download.allowedNetworks[{i}]: {net!r} is not a network in CIDR notation (e.g. 10.0.0.0/8)"
                for i, net in enumerate(download["allowedNetworks"]) if not _is_network(net)]
    problems += [f"spec.download.dnsServers[{i}]: {server!r} is not an IP address, with an optional :port"
                 for i, server in enumerate(download["dnsServers"]) if not _is_server(server)]
    if spec.get("latents") and download["outputFormat"] not in LATENTS_FORMATS:
        problems.append("spec.latents: the latents stage reads outputFormat "
                        f"{', '.join(LATENTS_FORMATS)}, not {download['outputFormat']!r}")
    if problems:
        raise SpecError("invalid part spec:\n  " + "\n  ".join(problems))
    return spec


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _is_server(text: str) -> bool:
    """An IP address, or IPv4:port, or [IPv6]:port (as c-ares takes them)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})|([0-9A-Fa-f:.]+)", text)
    if not m:
        return False
    address = m.group(1) or m.group(3) or m.group(5)
    port = m.group(2) or m.group(4)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return port is None or 0 < int(port) < 65536


def snake(name: str) -> str:
    """A spec or config key (camelCase) as a Python name."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def camel(name: str) -> str:
    """A Python name as its spec or config key."""
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


# The dataclasses below carry no defaults of their own: `from_dict` fills every field from the
# defaulted spec, so that SCHEMA is the only place a default is written.

@dataclasses.dataclass(frozen=True)
class Filter:
    min_width: int | None
    min_height: int | None
    max_punsafe: float | None
    max_pwatermark: float | None
    min_aesthetic: float | None
    min_similarity: float | None
    languages: tuple[str, ...] | None
    exclude: tuple[str, ...] | None
    sample_fraction: float
    seed: int
    dedupe_urls: bool
    shuffle: bool
    samples_per_shard: int


@dataclasses.dataclass(frozen=True)
class Download:
    image_size: int
    resize_mode: str
    resize_only_if_bigger: bool
    skip_reencode: bool
    downscale_interpolation: str
    upscale_interpolation: str
    encode_format: str
    encode_quality: int
    min_image_size: int
    max_aspect_ratio: float | None
    output_format: str
    timeout: float
    retries: int
    max_in_flight: int
    max_per_host: int
    max_redirects: int
    max_image_bytes: int
    max_image_pixels: int
    allowed_networks: tuple[str, ...]
    dns_servers: tuple[str, ...]
    respect_robots_txt: bool
    parallelism: int
    shard_retries: int
    user_agent_token: str
    disallowed_header_directives: tuple[str, ...]
    save_additional_columns: tuple[str, ...]
    compute_hash: str
    verify_tls: bool
    reduced_decode: bool
    mds_shard_size_limit: int


@dataclasses.dataclass(frozen=True)
class Dataset:
    uri: str
    format: str | None
    captions: str | None
    image_field: str
    caption_field: str


@dataclasses.dataclass(frozen=True)
class Output:
    uri: str
    endpoint: str | None
    region: str | None
    path_style: bool
    profile: str | None
    credentials_secret: str | None
    retry_seconds: float


@dataclasses.dataclass(frozen=True)
class Latents:
    vae: str
    vae_subfolder: str | None
    text_encoder: str
    text_encoder_subfolder: str | None
    tokenizer_subfolder: str | None
    resolution: int
    batch_size: int
    dtype: str
    save_dtype: str
    latent_mode: str
    seed: int
    parallelism: int
    shard_retries: int
    hub_download: bool
    hub_token_secret: str | None


def _build(kind, values: dict):
    """A spec section's dataclass from its defaulted mapping; fields the spec leaves unset are None."""
    given = {snake(k): tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**{f.name: given.get(f.name) for f in dataclasses.fields(kind)})


def _unbuild(obj) -> dict:
    return {camel(f.name): list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(obj) if (v := getattr(obj, f.name)) is not None}


@dataclasses.dataclass(frozen=True)
class Heal:
    reasons: tuple[str, ...]
    round: int

    @property
    def key(self) -> str:
        """What a finished heal records: the same key again heals nothing."""
        return f"{','.join(sorted(self.reasons))}#{self.round}"


def output_of(data: dict) -> Output:
    """An output section on its own (`laion-operator verify`), with the schema's defaults."""
    return _build(Output, apply_defaults(data, SCHEMA["properties"]["output"]))


@dataclasses.dataclass(frozen=True)
class PartSpec:
    part_id: str
    source: tuple[str, ...]  # parquet metadata to download; empty when the part converts `dataset`
    dataset: Dataset | None
    output: Output
    columns: dict[str, str]
    filter: Filter
    download: Download
    max_retries: int
    verify: bool
    latents: Latents | None
    heal: Heal | None
    suspend: bool
    priority: int
    active_deadline_seconds: int | None
    stall_seconds: int

    @classmethod
    def from_dict(cls, data: Any) -> "PartSpec":
        """The same PartSpec for the same input, whether the API server defaulted it first or not."""
        spec = validate(data)
        return cls(
            part_id=spec["partId"],
            source=tuple(spec["source"].get("urls") or ()),
            dataset=_build(Dataset, spec["source"]["dataset"]) if "dataset" in spec["source"] else None,
            output=_build(Output, spec["output"]),
            columns=dict(spec.get("columns") or {}),
            filter=_build(Filter, spec["filter"]),
            download=_build(Download, spec["download"]),
            max_retries=spec["maxRetries"],
            verify=spec["verify"],
            latents=_build(Latents, spec["latents"]) if spec.get("latents") else None,
            heal=_build(Heal, spec["heal"]) if "heal" in spec else None,
            suspend=spec["suspend"],
            priority=spec["priority"],
            active_deadline_seconds=spec.get("activeDeadlineSeconds"),
            stall_seconds=spec.get("stallSeconds", STALL_SECONDS),
        )

    def to_dict(self) -> dict:
        """The spec back in its YAML/CR form (what a Ray job receives)."""
        data = {
            "partId": self.part_id,
            "source": {"dataset": _unbuild(self.dataset)} if self.dataset else {"urls": list(self.source)},
            "filter": _unbuild(self.filter),
            "download": _unbuild(self.download),
            "output": _unbuild(self.output),
            "maxRetries": self.max_retries,
            "verify": self.verify,
            "suspend": self.suspend,
            "priority": self.priority,
        }
        if self.active_deadline_seconds is not None:
            data["activeDeadlineSeconds"] = self.active_deadline_seconds
        if self.stall_seconds != STALL_SECONDS:
            data["stallSeconds"] = self.stall_seconds
        if self.columns:
            data["columns"] = dict(self.columns)
        if self.latents:
            data["latents"] = _unbuild(self.latents)
        if self.heal is not None:
            data["heal"] = _unbuild(self.heal)
        return data


def load(path: str | Path) -> PartSpec:
    """Read a part YAML file: either a bare spec or a whole LaionPart manifest."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and data.get("kind") == "LaionPart":
        data = data.get("spec")
    try:
        return PartSpec.from_dict(data)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


# --- the dataset: many parts from one template ------------------------------------------------------

MAX_DATASET_PARTS = 1000


def _template_schema() -> dict:
    """The part spec without what differs per part (partId, source) or is the dataset's (suspend)."""
    template = copy.deepcopy(SCHEMA)
    for name in ("partId", "source", "suspend"):
        template["properties"].pop(name)
    template["required"] = ["output"]
    template["description"] = ("The spec of every part; each part's output goes to <output.uri>/part_<id>, "
                               "and a change reaches the parts as a change of their own spec would.")
    template["properties"]["output"]["properties"]["uri"]["description"] = \
        "The dataset's folder (local path or s3://bucket/prefix): part <id> writes to <uri>/part_<id>."
    return template


DATASET_SCHEMA: dict = {
    "type": "object",
    "required": ["source", "template"],
    "properties": {
        "source": {
            "type": "object",
            "description": "One part per parquet file: a list of files, or a pattern with a range.",
            "properties": {
                "urls": {
                    "type": "array", "minItems": 1, "maxItems": MAX_DATASET_PARTS,
                    "description": "Parquet files, one part each; part ids are the positions, from 0.",
                    "items": {"type": "string", "minLength": 1},
                },
                "pattern": _str("A parquet URL with {part} in it, e.g. s3://laion/2B-en-4.5_{part}.parquet; "
                                "part ids are the numbers first to last.", minLength=1),
                "first": _int("The pattern's first part number.", minimum=0),
                "last": _int("The pattern's last part number (included).", minimum=0),
                "digits": _int("Zero-pad part numbers (in the pattern and the part ids) to this many digits.",
                               minimum=0, maximum=10, default=0),
            },
            "x-kubernetes-validations": [
                {"rule": "has(self.urls) != has(self.pattern)",
                 "message": "set either urls or pattern (with first and last), not both"},
                {"rule": "!has(self.pattern) || (self.pattern.contains('{part}') && has(self.first) && "
                         "has(self.last))",
                 "message": "a pattern needs {part} in it, and first and last"},
                {"rule": "!has(self.first) || !has(self.last) || self.first <= self.last",
                 "message": "first must not be above last"},
                {"rule": f"!has(self.first) || !has(self.last) || self.last - self.first < {MAX_DATASET_PARTS}",
                 "message": f"a dataset has at most {MAX_DATASET_PARTS} parts (first to last)"},
            ],
        },
        "template": _template_schema(),
        "suspend": _bool("true suspends every part (their jobs stop, finished shards stay); false resumes them.",
                         False),
    },
}

_DATASET_VALIDATOR = jsonschema.Draft4Validator(_closed(DATASET_SCHEMA))


def validate_dataset(data: Any) -> dict:
    """Validate a raw LaionDataset spec, return it with defaults applied; SpecError names every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    errors = [_describe(e) for e in sorted(_DATASET_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))]
    if not errors:
        data = apply_defaults(data, DATASET_SCHEMA)
        errors = rule_errors(data, DATASET_SCHEMA)
    if errors:
        raise SpecError("invalid dataset spec:\n  " + "\n  ".join(errors))
    return data


def dataset_parts(data: dict) -> dict[str, dict]:
    """The part specs of a (validated) dataset spec, by part id, in order."""
    source = data["source"]
    digits = source.get("digits", 0)
    if source.get("urls"):
        urls = {f"{i:0{digits}d}": url for i, url in enumerate(source["urls"])}
    else:
        urls = {f"{n:0{digits}d}": source["pattern"].replace("{part}", f"{n:0{digits}d}")
                for n in range(source["first"], source["last"] + 1)}
    base = data["template"]["output"]["uri"].rstrip("/")
    parts = {}
    for part_id, url in urls.items():
        part = copy.deepcopy(data["template"])
        part["partId"] = part_id
        part["source"] = {"urls": [url]}
        part["output"]["uri"] = f"{base}/{part_dir(part_id)}"
        part["suspend"] = bool(data.get("suspend"))
        parts[part_id] = part
    return parts
