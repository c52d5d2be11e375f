"""The part spec's `source.archives`: tar and zip archives of images (JourneyDB, DiffusionDB, SA-1B,
COCO, webdataset tars), where they are and where each image's caption comes from."""

from __future__ import annotations

from . import patterns
from .fields import integer, string

# Where the archives are: one of these (a link file, SA-1B's, can be replaced by a fresh one on a re-run).
LOCATIONS = ["urls", "pattern", "links"]
ONE_LOCATION = " + ".join(f"(has(self.{name}) ? 1 : 0)" for name in LOCATIONS) + " == 1"
ONE_CAPTION_SOURCE = "has(self.sidecar) != has(self.annotations)"
JOIN_FIELDS = "!has(self.annotations) || (has(self.key) && has(self.caption))"

SIDECARS = ["txt", "json"]
# files: an archive of one caption file per image (key.txt, or key.json with its caption field)
ANNOTATION_FORMATS = ["jsonl", "json", "csv", "parquet", "files"]
JOINS = ["member", "basename", "stem", "id"]
# SA-1B's tars are about 11 GB each; an archive above this is refused before it is read.
MAX_ARCHIVE_BYTES = 64 << 30

_WHERE = "local paths, http(s):// (headersSecret's headers sent) or s3:// (output's endpoint options)"

CAPTIONS: dict = {
    "type": "object",
    "description": "Where each image's caption comes from: a sidecar member beside it, or an annotations "
    "file joined to the images; an image without a caption is counted (reason no_caption), not written.",
    "x-kubernetes-validations": [
        {"rule": ONE_CAPTION_SOURCE, "message": "give exactly one of sidecar or annotations"},
        {"rule": JOIN_FIELDS, "message": "annotations need key (the join field) and caption (the caption field)"},
    ],
    "properties": {
        "sidecar": string(
            "The member beside each image holding its caption: txt (key.txt) or json (key.json, its "
            "`field`), as in webdataset tars.",
            enum=SIDECARS,
        ),
        "field": string("sidecar json: the field holding the caption.", minLength=1, default="caption"),
        "annotations": string(
            "The annotations file: a path or URL (" + _WHERE + "); `<archive>#<member>` for a member of "
            "an archive (JourneyDB's train_anno_realease_repath.jsonl.tgz#train_anno_realease_repath.jsonl); "
            "`#<member>` for a member of each archive itself (DiffusionDB's #{stem}.json; a tar holding "
            "one is spooled to disk as a zip is); an archive without #<member>: one caption file per "
            "image (format files: SA-1B's captions, sa_1.txt and so on, read member by member, each record's "
            "_member its path). {stem} stands for the image archive's name without its suffix, so a "
            "URL with it names one annotations file per archive. The records' other fields become the "
            "samples' metadata columns (filter thresholds read them through spec.columns).",
            minLength=1,
        ),
        "format": string(
            "The annotations' format; unset: told by the file's name (.jsonl, .json, .csv, .parquet; an "
            "archive's name: files).",
            enum=ANNOTATION_FORMATS,
        ),
        "path": string(
            "json: where the records are, dot-separated: `annotations[]` (the list under annotations), "
            "`*` (an object's members, each member's name given as the record's field _key: "
            'DiffusionDB\'s {"<file>.webp": {"p": ...}}); unset: the file is a list of records.',
            minLength=1,
        ),
        "key": string(
            "The annotation field holding the join key (img_path, image_id, _key; files: _member).", minLength=1
        ),
        "caption": string(
            "The annotation field holding the caption (the first record for an image wins).", minLength=1
        ),
        "joinOn": string(
            "What of a member the key is compared to: member (its path in the archive, a leading ./ "
            "dropped), basename, stem (basename without suffix) or id (the image's id in `images`).",
            enum=JOINS,
            default="member",
        ),
        "images": {
            "type": "object",
            "description": "joinOn id: the json's table of images, mapping an id to a file name "
            "(COCO: path images[], id id, file file_name).",
            "required": ["path"],
            "properties": {
                "path": string("Where the image records are, as `path` says.", minLength=1),
                "id": string("The image record's id field.", minLength=1, default="id"),
                "file": string(
                    "The image record's field naming the file (compared to the member's base name).",
                    minLength=1,
                    default="file_name",
                ),
            },
        },
    },
}

ARCHIVES: dict = {
    "type": "object",
    "description": "Tar (.tar, .tar.gz, .tgz; streamed) or zip archives of images (spooled to a "
    "temporary file of at most maxArchiveBytes), each archive one shard of download.outputFormat; "
    "filter.sampleFraction picks whole archives, filter.minWidth/minHeight read the image's real size. "
    "Exactly one of urls, pattern or links.",
    "required": ["captions"],
    "x-kubernetes-validations": [
        {"rule": ONE_LOCATION, "message": "give exactly one of urls, pattern (with first and last) or links"},
        *patterns.rules(),
    ],
    "properties": {
        "urls": {
            "type": "array",
            "minItems": 1,
            "description": "The archives: " + _WHERE + ". An archive is known by its file name, which must be unique.",
            "items": {"type": "string", "minLength": 1},
        },
        **patterns.properties("JourneyDB: .../imgs/{part}.tgz"),
        "links": string(
            "A link file (SA-1B's), one archive a line: `file_name<TAB>url`, a header line allowed. "
            "Signed links expire (reason expired): a new file given on a re-run fetches the archives "
            "not yet done, finished ones are kept (known by file name).",
            minLength=1,
        ),
        "headersSecret": string(
            "Kubernetes Secret whose ARCHIVE_HEADERS holds HTTP headers for http(s) archives and "
            "annotations, one `Name: value` a line (a gated Hugging Face repo's `Authorization: Bearer "
            "hf_...`); given to the Ray job like the storage credentials, never in the spec, entrypoint "
            "or logs, and not sent on to another host a redirect leads to.",
            minLength=1,
        ),
        "maxArchiveBytes": integer(
            "Largest archive read: refused by Content-Length or size before reading, and reading stops "
            "past it; a zip spooled to disk takes at most this much.",
            minimum=1024,
            default=MAX_ARCHIVE_BYTES,
        ),
        "captions": CAPTIONS,
    },
}
