"""The part spec's model sections: `latents` (VAE latents and text embeddings of every sample) and
`embeddings` (CLIP image and caption embeddings, and the dedup over them), the models they load and
the numbers they are computed and kept in. What both stages share (their device, decode threads,
parallelism, retries and hub access) is written once, in SHARED."""

from __future__ import annotations

from .fields import boolean, integer, number, string

# latents.dtype: what the models compute in; auto is bfloat16 on a GPU and float32 on a CPU.
MODEL_DTYPES = ["auto", "float32", "float16", "bfloat16"]
SAVE_DTYPES = ["float16", "float32"]
LATENT_MODES = ["mean", "sample"]
# latents.reducedDecode's bound against a whole decode, in dB PSNR of the preprocessed pixels. The
# worst measured: 33.9 on photo-like JPEGs (median 43.8), 30.2 on tests/pipeline/test_latents_recipe.py's
# harsher ones (hard 8-pixel edges and noise, odd sides), which hold it.
REDUCED_DECODE_PSNR = 28

# What the two model stages share, field by field (each section's description names its own stage).
SHARED: dict = {
    "decodeThreads": integer(
        "Threads decoding images beside the model (0: the node's CPUs shared among its GPUs on a GPU, one on a CPU).",
        minimum=0,
        maximum=256,
        default=0,
    ),
    "dtype": string(
        "The models' compute dtype (auto: bfloat16 on a GPU, float32 on a CPU).",
        enum=MODEL_DTYPES,
        default="auto",
    ),
    "parallelism": integer(
        "Shards encoded at once (0: one per GPU of the Ray cluster, or per CPU without).",
        minimum=0,
        default=0,
    ),
    "shardRetries": integer("Times a failed shard is retried.", minimum=0, maximum=20, default=2),
    "hubDownload": boolean(
        "Let the stage download models named by hub id (false: local paths and the "
        "mounted cache only, HF_HUB_OFFLINE=1).",
        False,
    ),
    "hubTokenSecret": string(
        "Kubernetes Secret with HF_TOKEN, for gated models (operator); given to the Ray job like the "
        "storage credentials, never in the spec or the entrypoint."
    ),
}


def selection(of: str, default: bool | None) -> dict:
    """What a reader of an embedded output leaves out (pipeline/selection.py): `of` names the output.
    `default` None: the field is unset unless given (filter's: its fields decide the shards' fingerprint)."""
    drop: dict = {
        "type": "boolean",
        "description": f"Leave out the samples of {of} that its embeddings/duplicates.parquet "
        "marks as not kept (embeddings.dedup or laion-operator dedup), counted by kind.",
    }
    if default is not None:
        drop["default"] = default
    return {
        "dropDuplicates": drop,
        "scores": {
            "type": "object",
            "description": f"Thresholds on the columns of {of}'s embeddings metadata (clip_score, a head's "
            "column): column -> {min, max}; a sample without a score, or outside one, is left out.",
            "maxProperties": 16,
            "additionalProperties": {
                "type": "object",
                "minProperties": 1,
                "properties": {
                    "min": number("Keep samples whose score is at least this."),
                    "max": number("Keep samples whose score is at most this."),
                },
            },
        },
    }


LATENTS: dict = {
    "type": "object",
    "description": "Precompute VAE image latents and text-encoder embeddings of every downloaded sample, "
    "read back from its shard in any download.outputFormat (MDS under latents/, one Ray "
    "task per shard, on a GPU where the cluster has one).",
    "required": ["vae", "textEncoder"],
    "properties": {
        "vae": string(
            "diffusers AutoencoderKL: a local path, or a hub id found in the mounted cache "
            "(or downloaded with hubDownload).",
            minLength=1,
        ),
        "vaeSubfolder": string("The VAE's folder inside `vae` (a whole pipeline's repository: vae)."),
        "textEncoder": string(
            "Text encoder: a transformers model (local path or hub id), or an open_clip model "
            "as openclip:hf-hub:<repo> or openclip:<architecture>/<pretrained>.",
            minLength=1,
        ),
        "textEncoderSubfolder": string("The text encoder's folder inside `textEncoder` (a pipeline's: text_encoder)."),
        "tokenizerSubfolder": string(
            "The tokenizer's folder inside `textEncoder` (a pipeline's: tokenizer; unset: textEncoderSubfolder)."
        ),
        "resolution": integer(
            "Images are resized (shorter side) and center-cropped to this square (the one-item form of resolutions).",
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
        "saveImages": boolean(
            "Store each sample's image bytes too (column `jpg`, as micro_diffusion's --save_images).", False
        ),
        "reducedDecode": boolean(
            "Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) before the bicubic resize: "
            f"faster, pixels within {REDUCED_DECODE_PSNR} dB PSNR of the reference's whole decode "
            "(false: torchvision's Resize(r, BICUBIC) + CenterCrop(r) on the whole image, as "
            "micro_diffusion prepares its images).",
            False,
        ),
        "batchSize": integer("Samples encoded at once.", minimum=1, maximum=4096, default=32),
        "saveDtype": string("The stored latents' and embeddings' dtype.", enum=SAVE_DTYPES, default="float16"),
        "latentMode": string(
            "Store the latent distribution's mean, or a sample drawn by seed and key.",
            enum=LATENT_MODES,
            default="sample",
        ),
        "seed": integer(
            "Seed of the latent samples (each sample's noise depends on it and the key only).",
            minimum=0,
            default=0,
        ),
        **selection("the part's output", False),
        **SHARED,
    },
}

DEDUP: dict = {
    "type": "object",
    "description": "Find the part's duplicate images (embeddings/duplicates.parquet: key, kept key, kind, "
    "similarity); of each group the sample with the smallest key is kept.",
    "properties": {
        "exact": boolean("The same stored image bytes (SHA-256).", True),
        "perceptual": boolean("The same picture resized or recompressed (64-bit DCT hash).", True),
        "hammingDistance": integer(
            "Perceptual: DCT hashes this many bits apart or fewer are duplicates.", minimum=0, maximum=32, default=6
        ),
        "semantic": boolean("Image embeddings at or above `similarity` (cosine), grouped transitively.", True),
        "similarity": number("Semantic: the cosine similarity of duplicates.", minimum=0, maximum=1, default=0.95),
    },
}

EMBEDDINGS: dict = {
    "type": "object",
    "description": "CLIP image and caption embeddings of every downloaded sample, read back from its shard "
    "in any download.outputFormat, in clip-retrieval's layout under embeddings/ (img_emb, text_emb, metadata: "
    "what autofaiss and embedding-reader read); one Ray task per shard, on a GPU where the cluster has one.",
    "required": ["model"],
    "properties": {
        "model": string(
            "An open_clip model (hf-hub:<repo>, local-dir:<folder>, a folder with open_clip_config.json, or "
            "open_clip:<architecture>/<pretrained tag or file>), or a transformers CLIPModel (a local path "
            "or a hub id found in the mounted cache, or downloaded with hubDownload).",
            minLength=1,
        ),
        "batchSize": integer("Samples embedded at once.", minimum=1, maximum=4096, default=256),
        "dedup": DEDUP,
        "heads": {
            "type": "array",
            "maxItems": 16,
            "description": "Scores over each image embedding, one metadata column each (beside clip_score, the "
            "image-caption cosine similarity): a stack of linear layers saved by torch or safetensors, such as "
            "LAION's aesthetic predictor's MLP.",
            "items": {
                "type": "object",
                "required": ["name", "file"],
                "properties": {
                    "name": string("The metadata column.", pattern="^[a-z_][a-z0-9_]*$", maxLength=63),
                    "file": string("The head's weights (.pth, .pt, .bin or .safetensors), a local path.", minLength=1),
                    "activation": string(
                        "Between its layers (LAION's aesthetic MLP has none).", enum=["none", "relu"], default="none"
                    ),
                },
            },
        },
        "index": boolean(
            "Build FAISS indexes of the image and caption embeddings with autofaiss (embeddings/index/: "
            "image.index, text.index, ids.parquet mapping an index id to key, shard, url and caption).",
            False,
        ),
        "indexMemory": string(
            "The index's memory budget, autofaiss's max_index_memory_usage (e.g. 512M, 4G, 100G).",
            pattern="^[0-9]+[KMGT]?$",
            default="4G",
        ),
        **SHARED,
    },
}
