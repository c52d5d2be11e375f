"""Small, randomly initialised models laid out like a diffusion pipeline's repository, for the tests and
the benchmark of the latents stage (nothing here can reach a model hub):

    <root>/vae/            diffusers AutoencoderKL (config.json + safetensors)
    <root>/text_encoder/   transformers CLIPTextModel
    <root>/tokenizer/      a CLIP BPE tokenizer over a byte-level vocabulary, built from files written here

They are loaded by the stage exactly as a downloaded model is: `from_pretrained(root, subfolder=…)`.
"""

from __future__ import annotations

import json
from pathlib import Path


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    # A few merges, so that common words become one token as in a real vocabulary.
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))


def build(
    root: str | Path,
    vae_blocks: tuple[int, ...] = (8, 8, 16),
    text_width: int = 32,
    text_layers: int = 2,
    seed: int = 0,
    layers_per_block: int = 1,
    text_heads: int = 4,
    scaling_factor: float = 0.5,
    norm_groups: int | None = None,
    text_intermediate: int | None = None,
) -> Path:
    """Write the three models under `root`; returns it. The VAE halves the image side per extra block
    (three blocks: 4×, where Stable Diffusion's four give 8×); the bench passes Stable Diffusion's own
    shapes (bench/latents_bench.py), with random weights all the same."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=vae_blocks,
        norm_num_groups=norm_groups or min(vae_blocks),
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(str(root / "vae"))
    write_tokenizer(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=text_intermediate or 2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(config).save_pretrained(str(root / "text_encoder"))
    return root


# --- CLIP, for the embeddings stage ------------------------------------------------------------------

CLIP_IMAGE_SIZE = 32
CLIP_EMBED_DIM = 16
# Not CLIP's own numbers, so that a stage normalising with the wrong ones shows in the values.
CLIP_MEAN = [0.5, 0.4, 0.3]
CLIP_STD = [0.2, 0.25, 0.3]


def open_clip_config(image_size: int = CLIP_IMAGE_SIZE, embed_dim: int = CLIP_EMBED_DIM, **preprocess) -> dict:
    """open_clip's open_clip_config.json of a small ViT CLIP (its tokenizer is the one open_clip ships)."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {
            "size": image_size,
            "mean": CLIP_MEAN,
            "std": CLIP_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            **preprocess,
        },
    }


def build_open_clip(root: str | Path, seed: int = 0, **preprocess) -> Path:
    """An open_clip checkpoint folder (open_clip_config.json + open_clip_model.safetensors), random
    weights, as `hf-hub:` repositories and `local-dir:` folders hold them; returns the folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = open_clip_config(**preprocess)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config["model_cfg"])
    (root / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    return root


def build_hf_clip(root: str | Path, seed: int = 0) -> Path:
    """A transformers CLIPModel folder with its tokenizer and CLIPImageProcessor, random weights."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    root = Path(root)
    write_tokenizer(root)
    tokenizer = CLIPTokenizer.from_pretrained(str(root))
    torch.manual_seed(seed)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": CLIP_IMAGE_SIZE,
        "patch_size": 8,
    }
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_EMBED_DIM)).save_pretrained(
        str(root)
    )
    CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(str(root))
    return root
