"""The model stages' models, loaded the way their libraries load them: for latents diffusers'
`AutoencoderKL` and a transformers text encoder (CLIP, T5, or any model with a `last_hidden_state`)
or an open_clip one; for embeddings a CLIP model, open_clip's or transformers' `CLIPModel`. A model is
a local path, or a hub id found in the Hugging Face cache mounted on the workers; the hub is reached
only with the section's `hubDownload`, and a gated model's token comes in HF_TOKEN (its
`hubTokenSecret`), never in the spec. Both stages load through `go_offline`, `pick_device` and the
one-set-at-a-time cache (`cached`).

torch, diffusers and transformers are imported here only, when a shard is encoded: `make demo` and
the operator never load them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from ..errors import InputError
from ..spec import Embeddings, Latents

OPEN_CLIP = "openclip:"
# What names an open_clip model for the embeddings stage: the project's prefix, clip-retrieval's, and
# open_clip's own schemas; a folder holding this config is one too.
OPEN_CLIP_NAMES = (OPEN_CLIP, "open_clip:", "hf-hub:", "local-dir:")
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CLIP = "hf_clip:"  # clip-retrieval's prefix for a transformers CLIPModel
# OpenAI's CLIP normalisation, what transformers' CLIPImageProcessor defaults to.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelError(InputError):
    """A model that cannot be loaded; the message names the spec field. Retrying cannot help."""


def go_offline(settings: Latents | Embeddings) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE when it is imported: set before the first import."""
    if not settings.hub_download:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:  # imported already (this Ray worker ran another task)
            constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]  # a module found by name, untyped


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return getattr(torch, name)


def pick_device() -> str:
    """The GPU Ray gave this task (it sets CUDA_VISIBLE_DEVICES), or the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fail(field: str, name: str, err: BaseException, section: str = "latents") -> ModelError:
    return ModelError(
        f"spec.{section}.{field}: cannot load {name!r}: {type(err).__name__}: "
        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    )


def load_vae(settings: Latents, device: str):
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(
            settings.vae, subfolder=settings.vae_subfolder, torch_dtype=torch_dtype(settings.dtype, device)
        )
    except (OSError, ValueError) as err:
        raise _fail("vae", settings.vae, err) from err
    return vae.to(device).eval().requires_grad_(False)


@dataclass
class LatentScale:
    """How stored latents relate to the VAE's: stored = (z - shift) * scale (diffusers' convention)."""

    scale: float
    shift: float

    @classmethod
    def of(cls, vae) -> LatentScale:
        return cls(float(vae.config.scaling_factor or 1.0), float(getattr(vae.config, "shift_factor", None) or 0.0))


def sample_noise(keys: list[str], shape: tuple[int, ...], seed: int):
    """Standard normal noise for each sample, drawn on the CPU from (seed, key) only: the same latents
    whatever the batch, the shard's retry, the device or the number of workers."""
    import torch

    out = torch.empty((len(keys), *shape), dtype=torch.float32)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        out[i] = torch.randn(shape, generator=generator)
    return out


def normalize(pixels):
    """uint8 (N, 3, H, W) to [-1, 1] float32 (torchvision's ToTensor + Normalize(0.5, 0.5))."""
    return pixels.float().div_(127.5).sub_(1.0)


def encode_images(vae, pixels, keys: list[str], mode: str, seed: int, scale: LatentScale):
    """Latents of a batch of images (N, 3, H, W), in [-1, 1] or uint8: the distribution's mean or a sample."""
    import torch

    with torch.inference_mode():
        if pixels.dtype == torch.uint8:  # normalized on the device: a quarter of the bytes cross
            pixels = normalize(pixels.to(vae.device, non_blocking=True))
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        z = dist.mean
        if mode == "sample":
            noise = sample_noise(keys, tuple(z.shape[1:]), seed).to(z.device, z.dtype)
            z = z + dist.std * noise
        return (z - scale.shift) * scale.scale


def decode_latents(vae, latents, scale: LatentScale):
    """Images in [-1, 1] back from stored latents (what a trainer's sampler does at the end)."""
    import torch

    with torch.inference_mode():
        z = latents.to(vae.device, vae.dtype) / scale.scale + scale.shift
        return vae.decode(z).sample


class TransformersTextEncoder:
    """Token-level hidden states (N, max_length, width) of a transformers encoder."""

    def __init__(self, settings: Latents, device: str):
        import transformers

        name, sub = settings.text_encoder, settings.text_encoder_subfolder or ""
        dtype = torch_dtype(settings.dtype, device)
        try:
            config = transformers.AutoConfig.from_pretrained(name, subfolder=sub)
            kind: type[transformers.PreTrainedModel] = {
                "clip": transformers.CLIPTextModel,
                "clip_text_model": transformers.CLIPTextModel,
                "t5": transformers.T5EncoderModel,
                "mt5": transformers.T5EncoderModel,
                "umt5": transformers.UMT5EncoderModel,
            }.get(config.model_type, transformers.AutoModel)
            self.model = kind.from_pretrained(name, subfolder=sub, dtype=dtype).to(device).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                name, subfolder=settings.tokenizer_subfolder or sub
            )
        except (OSError, ValueError, KeyError) as err:
            raise _fail("textEncoder", name, err) from err
        self.model.requires_grad_(False)
        text_config = getattr(config, "text_config", None) or config
        limit = getattr(text_config, "max_position_embeddings", None) or 512
        self.max_length = min(int(self.tokenizer.model_max_length), int(limit))
        # CLIP's causal attention never lets a real token see the padding, and Stable Diffusion's
        # pipelines pass no mask; encoders that attend both ways need it.
        self.use_mask = not config.model_type.startswith("clip")
        self.device = device

    def __call__(self, captions: list[str]):
        import torch

        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        with torch.inference_mode():
            out = self.model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.to(self.device) if self.use_mask else None,
            )
        return out.last_hidden_state


class OpenClipTextEncoder:
    """Token-level hidden states of an open_clip text tower (as micro_diffusion takes them), from
    `openclip:hf-hub:<repo>` or `openclip:<architecture>/<pretrained tag or file>`."""

    def __init__(self, settings: Latents, device: str):
        name = settings.text_encoder[len(OPEN_CLIP) :]
        try:
            import open_clip
        except ImportError as err:
            raise ModelError(
                f"spec.latents.textEncoder: {settings.text_encoder!r} needs open_clip "
                f"(pip install open-clip-torch): {err}"
            ) from err
        try:
            if name.startswith("hf-hub:"):
                model = open_clip.create_model(name)
            else:
                arch, _, pretrained = name.partition("/")
                model = open_clip.create_model(arch, pretrained=pretrained or None)
            self.tokenizer = open_clip.get_tokenizer(name.split("/")[0] if not name.startswith("hf-hub:") else name)
        except (OSError, RuntimeError, ValueError) as err:
            raise _fail("textEncoder", settings.text_encoder, err) from err
        self.model = model.to(device, torch_dtype(settings.dtype, device)).eval().requires_grad_(False)
        self.device = device

    def __call__(self, captions: list[str]):
        import torch

        m = self.model
        with torch.inference_mode():
            text = self.tokenizer(captions).to(self.device)
            x = m.token_embedding(text).to(m.ln_final.weight.dtype) + m.positional_embedding
            x = m.transformer(x, attn_mask=m.attn_mask)
            return m.ln_final(x)


def load_text_encoder(settings: Latents, device: str):
    if settings.text_encoder.startswith(OPEN_CLIP):
        return OpenClipTextEncoder(settings, device)
    return TransformersTextEncoder(settings, device)


_CACHE: dict = {}
LOADS = [0]  # the models this process loaded: a shard's stats tell a load from a cache hit by it


def cached(settings: Latents | Embeddings, key: tuple, make):
    """`make(device)`'s models, kept for the next shard this Ray worker encodes with the same ones
    (a shard task's worker process outlives the task: shard_task sets no max_calls, so Ray reuses
    it, GPU tasks included): one set in memory at a time, loaded offline unless the section's
    hubDownload allows the hub."""
    if key not in _CACHE:
        go_offline(settings)
        device = pick_device()
        _CACHE.clear()
        _CACHE[key] = make(device)
        LOADS[0] += 1
    return _CACHE[key]


def load(settings: Latents):
    """(device, vae, text encoder), the latents stage's models."""
    key = (
        settings.vae,
        settings.vae_subfolder,
        settings.text_encoder,
        settings.text_encoder_subfolder,
        settings.tokenizer_subfolder,
        settings.dtype,
    )
    return cached(settings, key, lambda d: (d, load_vae(settings, d), load_text_encoder(settings, d)))


# --- the embeddings stage's CLIP ------------------------------------------------------------------


class Clip:
    """A CLIP model's two towers as the embeddings stage calls them: `images` of uint8 (N, 3, size,
    size) pixels, prepared as the model's own preprocessing prepares them (shorter side to `size`,
    bicubic, center crop) and normalised here on the device, and `texts` of captions; both give the
    model's projected features, not yet of unit length."""

    size: int
    device: str

    def __init__(self, mean, std, device: str, dtype):
        import torch

        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.device, self.dtype = device, dtype

    def pixels(self, uint8):
        x = uint8.to(self.device, non_blocking=True).float().div_(255.0)
        return ((x - self.mean) / self.std).to(self.dtype)

    def images(self, uint8): ...

    def texts(self, captions: list[str]): ...


def _clip_preprocessing(model: str, size, resize_mode: str, interpolation: str) -> int:
    """The square side the stage prepares images at, if the model's preprocessing is the one it does."""
    side = size if isinstance(size, int) else size[0] if len(set(size)) == 1 else None
    if side is None or resize_mode != "shortest" or interpolation != "bicubic":
        raise ModelError(
            f"spec.embeddings.model: {model!r} prepares images as {resize_mode} resize to {size}, "
            f"{interpolation}: the stage prepares them as shorter-side resize, bicubic, square center crop"
        )
    return int(side)


class OpenClip(Clip):
    def __init__(self, settings: Embeddings, device: str):

        name = settings.model
        for prefix in (OPEN_CLIP, "open_clip:"):
            name = name.removeprefix(prefix)
        if not name.startswith(("hf-hub:", "local-dir:")) and os.path.isfile(os.path.join(name, OPEN_CLIP_CONFIG)):
            name = f"local-dir:{name}"
        try:
            import open_clip
        except ImportError as err:
            raise ModelError(f"spec.embeddings.model: {settings.model!r} needs open-clip-torch: {err}") from err
        try:
            if name.startswith(("hf-hub:", "local-dir:")):
                model = open_clip.create_model(name)
                self.tokenizer = open_clip.get_tokenizer(name)
            else:
                arch, _, pretrained = name.partition("/")
                model = open_clip.create_model(arch, pretrained=pretrained or None)
                self.tokenizer = open_clip.get_tokenizer(arch)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise _fail("model", settings.model, err, "embeddings") from err
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.size = _clip_preprocessing(
            settings.model,
            cfg.get("size", 224),
            cfg.get("resize_mode", "shortest"),
            cfg.get("interpolation", "bicubic"),
        )
        dtype = torch_dtype(settings.dtype, device)
        super().__init__(cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD), device, dtype)
        self.model = model.to(device, dtype).eval().requires_grad_(False)

    def images(self, uint8):
        import torch

        with torch.inference_mode():
            return self.model.encode_image(self.pixels(uint8))

    def texts(self, captions: list[str]):
        import torch

        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer(captions).to(self.device))


class TransformersClip(Clip):
    def __init__(self, settings: Embeddings, device: str):
        import transformers

        name = settings.model.removeprefix(HF_CLIP)
        dtype = torch_dtype(settings.dtype, device)
        try:
            model = transformers.CLIPModel.from_pretrained(name, dtype=dtype)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError) as err:
            raise _fail("model", settings.model, err, "embeddings") from err
        try:
            processor = transformers.CLIPImageProcessor.from_pretrained(name)
        except OSError:  # a checkpoint saved without one: CLIP's own preprocessing at the model's size
            processor = transformers.CLIPImageProcessor(
                size={"shortest_edge": model.config.vision_config.image_size},
                crop_size=model.config.vision_config.image_size,
            )
        crop = processor.crop_size
        short = processor.size.get("shortest_edge")
        mode = "shortest" if processor.do_center_crop and short == crop["height"] == crop["width"] else "other"
        bicubic = "bicubic" if int(processor.resample) == 3 else f"resample {int(processor.resample)}"
        self.size = _clip_preprocessing(settings.model, (crop["height"], crop["width"]), mode, bicubic)
        super().__init__(processor.image_mean, processor.image_std, device, dtype)
        self.model = model.to(device).eval().requires_grad_(False)
        self.max_length = min(int(self.tokenizer.model_max_length), model.config.text_config.max_position_embeddings)

    def images(self, uint8):
        import torch

        with torch.inference_mode():
            return self.model.get_image_features(pixel_values=self.pixels(uint8))

    def texts(self, captions: list[str]):
        import torch

        tokens = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            return self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)


def load_head(settings: Embeddings, n: int, dim: int, device: str):
    """embeddings.heads[n]: its linear layers, in the order their names sort in (`layers.0`, `layers.2`,
    … as torch's Sequential names them), as one module over `dim`-wide embeddings giving one score."""
    import re

    import torch

    assert settings.heads is not None
    head, field = settings.heads[n], f"spec.embeddings.heads.{n}.file"
    try:
        if head.file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(head.file)
        else:
            state = torch.load(head.file, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"{field}: cannot load {head.file!r}: {type(err).__name__}: {err}") from err

    def order(key: str) -> list:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]

    weights = sorted((k for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2), key=order)
    layers: list = []
    for key in weights:
        w, bias = state[key], state.get(key[: -len("weight")] + "bias")
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        linear.load_state_dict({"weight": w, **({"bias": bias} if bias is not None else {})})
        if layers and head.activation == "relu":
            layers.append(torch.nn.ReLU())
        layers.append(linear)
    widths = [(layer.in_features, layer.out_features) for layer in layers if isinstance(layer, torch.nn.Linear)]
    if not widths or widths[0][0] != dim or widths[-1][1] != 1:
        raise ModelError(
            f"{field}: {head.file!r} is not a head over {dim}-wide embeddings giving one score "
            f"(its linear layers: {widths or 'none'})"
        )
    return torch.nn.Sequential(*layers).to(device).eval().requires_grad_(False)


def is_open_clip(name: str) -> bool:
    return name.startswith(OPEN_CLIP_NAMES) or os.path.isfile(os.path.join(name, OPEN_CLIP_CONFIG))


def load_clip(settings: Embeddings) -> Clip:
    """The embeddings stage's CLIP model, on this task's device."""
    kind = OpenClip if is_open_clip(settings.model) else TransformersClip
    return cached(settings, ("clip", settings.model, settings.dtype), lambda device: kind(settings, device))
