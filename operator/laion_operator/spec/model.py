"""The typed part: `PartSpec` and its sections, built from a validated, defaulted spec and back."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ..names import camel, snake
from .patterns import numbered
from .schema import SCHEMA, STALL_SECONDS
from .validation import SpecError, apply_defaults, validate

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
    drop_duplicates: bool | None  # source.dataset's duplicates (unset: kept)
    scores: dict[str, dict[str, float]] | None  # thresholds on source.dataset's embeddings metadata


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
    min_body_rate: float
    retries: int
    max_in_flight: int
    max_per_host: int
    max_per_host_per_task: int
    host_budget: str
    max_redirects: int
    max_image_bytes: int
    max_image_pixels: int
    allowed_networks: tuple[str, ...]
    dns_servers: tuple[str, ...]
    respect_robots_txt: bool
    parallelism: int
    shard_retries: int
    user_agent_token: str
    user_agent: str | None
    disallowed_header_directives: tuple[str, ...]
    respect_tdm_rep: bool
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
class Embedded:
    urls: tuple[str, ...] | None
    pattern: str | None
    first: int | None
    last: int | None
    digits: int
    image_column: str | None
    caption_column: str | None

    @property
    def files(self) -> tuple[str, ...]:
        """The parquet files, listed or numbered by the pattern."""
        return self.urls or tuple(numbered(self.pattern or "", self.first, self.last, self.digits))


@dataclasses.dataclass(frozen=True)
class ImageTable:
    path: str
    id: str
    file: str


@dataclasses.dataclass(frozen=True)
class Captions:
    sidecar: str | None
    field: str
    annotations: str | None
    format: str | None
    path: str | None
    key: str | None
    caption: str | None
    join_on: str
    images: ImageTable | None


@dataclasses.dataclass(frozen=True)
class Archives:
    urls: tuple[str, ...] | None
    pattern: str | None
    first: int | None
    last: int | None
    digits: int
    links: str | None
    headers_secret: str | None
    max_archive_bytes: int
    captions: Captions

    @classmethod
    def of(cls, values: dict) -> Archives:
        captions = values["captions"]
        images = _build(ImageTable, captions["images"]) if "images" in captions else None
        return dataclasses.replace(
            _build(cls, values), captions=dataclasses.replace(_build(Captions, captions), images=images)
        )

    def to_dict(self) -> dict:
        captions = _unbuild(self.captions)
        if self.captions.images is not None:
            captions["images"] = _unbuild(self.captions.images)
        return {**_unbuild(self), "captions": captions}


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
    resolutions: tuple[int, ...] | None
    save_images: bool
    reduced_decode: bool
    batch_size: int
    decode_threads: int
    dtype: str
    save_dtype: str
    latent_mode: str
    seed: int
    drop_duplicates: bool
    scores: dict[str, dict[str, float]] | None
    parallelism: int
    shard_retries: int
    hub_download: bool
    hub_token_secret: str | None

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every square the stage encodes, ascending: `resolutions`, or `resolution` alone."""
        return tuple(sorted(self.resolutions)) if self.resolutions else (self.resolution,)


@dataclasses.dataclass(frozen=True)
class Dedup:
    exact: bool
    perceptual: bool
    hamming_distance: int
    semantic: bool
    similarity: float


@dataclasses.dataclass(frozen=True)
class Head:
    name: str
    file: str
    activation: str


@dataclasses.dataclass(frozen=True)
class Embeddings:
    model: str
    batch_size: int
    dedup: Dedup | None
    heads: tuple[Head, ...] | None
    index: bool
    index_memory: str
    decode_threads: int
    dtype: str
    parallelism: int
    shard_retries: int
    hub_download: bool
    hub_token_secret: str | None

    @classmethod
    def of(cls, values: dict) -> Embeddings:
        dedup, heads = values.get("dedup"), values.get("heads")
        return dataclasses.replace(
            _build(cls, values),
            dedup=_build(Dedup, dedup) if dedup is not None else None,
            heads=tuple(_build(Head, h) for h in heads) if heads is not None else None,
        )

    def to_dict(self) -> dict:
        data = {**_unbuild(self), **({"dedup": _unbuild(self.dedup)} if self.dedup else {})}
        if self.heads is not None:
            data["heads"] = [_unbuild(h) for h in self.heads]
        return data


def _build(kind, values: dict):
    """A spec section's dataclass from its defaulted mapping; fields the spec leaves unset are None."""
    given = {snake(k): tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**{f.name: given.get(f.name) for f in dataclasses.fields(kind)})


def _unbuild(obj) -> dict:
    return {
        camel(f.name): list(v) if isinstance(v, tuple) else v
        for f in dataclasses.fields(obj)
        if (v := getattr(obj, f.name)) is not None
    }


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
    source: tuple[str, ...]  # metadata to download (URL lists); empty when the part converts `dataset`
    dataset: Dataset | None
    embedded: Embedded | None  # source.embedded: parquet with the images inside
    archives: Archives | None  # source.archives: tar and zip archives of images
    output: Output
    columns: dict[str, str]
    filter: Filter
    download: Download
    max_retries: int
    verify: bool
    latents: Latents | None
    embeddings: Embeddings | None
    heal: Heal | None
    suspend: bool
    priority: int
    active_deadline_seconds: int | None
    stall_seconds: int
    source_format: str | None  # source.format: every file's format, whatever its name
    source_header: tuple[str, ...] | None  # source.header: header-less csv/tsv files' column names

    @classmethod
    def from_dict(cls, data: Any) -> PartSpec:
        """The same PartSpec for the same input, whether the API server defaulted it first or not."""
        spec = validate(data)
        return cls(
            part_id=spec["partId"],
            source=tuple(spec["source"].get("urls") or ()),
            dataset=_build(Dataset, spec["source"]["dataset"]) if "dataset" in spec["source"] else None,
            embedded=_build(Embedded, spec["source"]["embedded"]) if "embedded" in spec["source"] else None,
            archives=Archives.of(spec["source"]["archives"]) if "archives" in spec["source"] else None,
            output=_build(Output, spec["output"]),
            columns=dict(spec.get("columns") or {}),
            filter=_build(Filter, spec["filter"]),
            download=_build(Download, spec["download"]),
            max_retries=spec["maxRetries"],
            verify=spec["verify"],
            latents=_build(Latents, spec["latents"]) if spec.get("latents") else None,
            embeddings=Embeddings.of(spec["embeddings"]) if spec.get("embeddings") else None,
            heal=_build(Heal, spec["heal"]) if "heal" in spec else None,
            suspend=spec["suspend"],
            priority=spec["priority"],
            active_deadline_seconds=spec.get("activeDeadlineSeconds"),
            stall_seconds=spec.get("stallSeconds", STALL_SECONDS),
            source_format=spec["source"].get("format"),
            source_header=tuple(spec["source"]["header"]) if "header" in spec["source"] else None,
        )

    def _source(self) -> dict:
        if self.dataset:
            return {"dataset": _unbuild(self.dataset)}
        if self.embedded:
            return {"embedded": _unbuild(self.embedded)}
        if self.archives:
            return {"archives": self.archives.to_dict()}
        return self._urls()

    def _urls(self) -> dict:
        # format and header only when set: a parquet part's source (and so its fingerprint) is as before
        urls: dict[str, Any] = {"urls": list(self.source)}
        if self.source_format is not None:
            urls["format"] = self.source_format
        if self.source_header is not None:
            urls["header"] = list(self.source_header)
        return urls

    def to_dict(self) -> dict:
        """The spec back in its YAML/CR form (what a Ray job receives)."""
        data = {
            "partId": self.part_id,
            "source": self._source(),
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
        if self.embeddings:
            data["embeddings"] = self.embeddings.to_dict()
        if self.heal is not None:
            data["heal"] = _unbuild(self.heal)
        return data


def load_data(path: str | Path) -> Any:
    """A part YAML file's spec mapping, not validated: a bare spec or a whole LaionPart manifest's."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and data.get("kind") == "LaionPart":
        data = data.get("spec")
    return data


def load(path: str | Path) -> PartSpec:
    """Read a part YAML file: either a bare spec or a whole LaionPart manifest."""
    data = load_data(path)
    try:
        return PartSpec.from_dict(data)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
