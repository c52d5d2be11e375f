"""The part spec: one model for the CLI's YAML and the LaionPart custom resource's `spec`.

`schema.SCHEMA` is the single source: the CRD's openAPIV3Schema is generated from it (`laion-operator
crd`), the CLI validates against it with the same messages, and its defaults are applied the way the
Kubernetes API server applies them, so a part behaves the same whichever way it arrives.

    schema      SCHEMA, its enums and limits (the only place a default is written); its source and
                latents sections in schema_source and schema_latents, the leaf fields in fields
    validation  the schema checked as the API server checks it, the CEL rules' Python twins (RULES)
    model       PartSpec and its typed sections, built from a validated spec and back (`load`)
    dataset     the LaionDataset spec: a part template and the parts made from it

Below it sit `contract` and `errors`/`names`; nothing here imports the pipeline or the control plane.
"""

from .dataset import DATASET_SCHEMA, MAX_DATASET_PARTS, dataset_parts, validate_dataset
from .model import (
    Archives,
    Captions,
    Dataset,
    Dedup,
    Download,
    Embeddings,
    Filter,
    Head,
    Heal,
    Latents,
    Output,
    PartSpec,
    load,
    load_data,
    output_of,
)
from .schema import (
    DECODE_BACKLOG_BYTES,
    ENCODE_FORMATS,
    ENCODE_QUALITY,
    HASHES,
    INTERPOLATIONS,
    LOGICAL_COLUMNS,
    MAX_IN_FLIGHT,
    MAX_PER_HOST,
    MDS_SHARD_SIZE,
    OUTPUT_FORMATS,
    PNG_MAX_COMPRESSION,
    RESIZE_MODES,
    SCHEMA,
    STALL_SECONDS,
)
from .schema_latents import LATENT_MODES, MODEL_DTYPES, REDUCED_DECODE_PSNR, SAVE_DTYPES
from .schema_source import DATASET_FORMATS
from .validation import RULES, SpecError, apply_defaults, rule_errors, validate

__all__ = [
    "DATASET_FORMATS",
    "DATASET_SCHEMA",
    "DECODE_BACKLOG_BYTES",
    "ENCODE_FORMATS",
    "ENCODE_QUALITY",
    "HASHES",
    "INTERPOLATIONS",
    "LATENT_MODES",
    "LOGICAL_COLUMNS",
    "MAX_DATASET_PARTS",
    "MAX_IN_FLIGHT",
    "MAX_PER_HOST",
    "MDS_SHARD_SIZE",
    "MODEL_DTYPES",
    "OUTPUT_FORMATS",
    "PNG_MAX_COMPRESSION",
    "REDUCED_DECODE_PSNR",
    "RESIZE_MODES",
    "RULES",
    "SAVE_DTYPES",
    "SCHEMA",
    "STALL_SECONDS",
    "Dataset",
    "Download",
    "Filter",
    "Heal",
    "Latents",
    "Dedup",
    "Head",
    "Embeddings",
    "Archives",
    "Captions",
    "Output",
    "PartSpec",
    "SpecError",
    "apply_defaults",
    "dataset_parts",
    "load",
    "load_data",
    "output_of",
    "rule_errors",
    "validate",
    "validate_dataset",
]
