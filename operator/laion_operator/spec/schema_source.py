"""The part spec's `source` section: what a part reads, one kind of input each (sources/ in the
pipeline, one module a kind), and the file formats a URL list may be in."""

from __future__ import annotations

from . import patterns
from .fields import string
from .schema_archives import ARCHIVES

# What `source.dataset` reads: img2dataset-style tars, a `files` folder, or images plus a captions JSONL.
DATASET_FORMATS = ["webdataset", "files", "images"]
# What `source.urls` reads: img2dataset's input formats (txt: one URL a line), each optionally compressed.
LIST_FORMATS = ["parquet", "csv", "tsv", "json", "jsonl", "txt"]
LIST_COMPRESSIONS = [".gz", ".bz2", ".xz", ".zst"]
# The kinds of input, one of which a part reads: CEL counts the ones given.
KINDS = ["urls", "dataset", "archives", "embedded"]
EXACTLY_ONE = " + ".join(f"(has(self.{kind}) ? 1 : 0)" for kind in KINDS) + " == 1"
# `source.embedded`'s columns when imageColumn / captionColumn are unset: the first of these the file has
# (Hugging Face image datasets, webdataset-style names, TextCaps' list of reference captions).
IMAGE_COLUMNS = ("image", "jpg", "png", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt", "reference_strs")

SOURCE: dict = {
    "type": "object",
    "description": "What the part reads: metadata to download (urls), a dataset to convert "
    "(dataset) or parquet with the images inside (embedded), exactly one of them.",
    # A CEL rule, not JSON Schema's oneOf, which would only say "not valid under any".
    "x-kubernetes-validations": [
        {
            "rule": EXACTLY_ONE,
            "message": "give exactly one of urls (metadata to download), dataset (an existing dataset to convert), "
            "archives (tar or zip archives of images) or embedded (parquet with the images inside)",
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
        "format": string(
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
                "uri": string(
                    "Folder: local path or s3://bucket/prefix (s3 uses output's endpoint options).", minLength=1
                ),
                "format": string(
                    "webdataset (NNNNN.tar of key.jpg/.txt/.json), files (NNNNN/ folders of "
                    "key.jpg/.txt/.json) or images (image files and a captions JSONL); unset: "
                    "detected.",
                    enum=DATASET_FORMATS,
                ),
                "captions": string(
                    "images: the JSONL file, one object a line naming an image and its "
                    "caption (a path relative to uri, or absolute, or a URL).",
                    minLength=1,
                ),
                "imageField": string(
                    "images: the JSONL field holding the image path, relative to uri.",
                    minLength=1,
                    default="img_path",
                ),
                "captionField": string("images: the JSONL field holding the caption.", minLength=1, default="prompt"),
            },
        },
        "archives": ARCHIVES,
        "embedded": {
            "type": "object",
            "description": "Parquet files whose rows hold the images themselves (Hugging Face image "
            "datasets such as TextCaps), written in download.outputFormat; every samplesPerShard rows "
            "(whole row groups where they fit) are a shard.",
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.urls) != has(self.pattern)",
                    "message": "set either urls or pattern (with first and last), not both",
                },
                *patterns.rules(),
            ],
            "properties": {
                "urls": {
                    "type": "array",
                    "minItems": 1,
                    "description": "Parquet files: local paths, http(s):// or s3:// URLs (s3 uses "
                    "output's endpoint options).",
                    "items": {"type": "string", "minLength": 1},
                },
                **patterns.properties("TextCaps: .../data/train-{part}-of-00013.parquet"),
                "imageColumn": string(
                    "The column holding each row's image: bytes, or the Hugging Face {bytes, path} "
                    "struct; unset: the first of " + ", ".join(IMAGE_COLUMNS) + " the file has.",
                    minLength=1,
                ),
                "captionColumn": string(
                    "The column holding each row's caption: a string, or a list of strings (the first "
                    "is taken); unset: the first of " + ", ".join(CAPTION_COLUMNS) + " the file has.",
                    minLength=1,
                ),
            },
        },
    },
}
