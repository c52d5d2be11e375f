"""The latents stage's models, loaded the way their libraries load them: diffusers' `AutoencoderKL`,
and a transformers text encoder (CLIP, T5, or any model with a `last_hidden_state`) or an open_clip
one. A model is a local path, or a hub id found in the Hugging Face cache mounted on the workers;
the hub is reached only with `latents.hubDownload`, and a gated model's token comes in HF_TOKEN
(the part's `latents.hubTokenSecret`), never in the spec.

torch, diffusers and transformers are imported here only, when a shard is encoded: `make demo` and
the operator never load them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from ..errors import InputError
from ..spec import Latents

OPEN_CLIP = "openclip:"


class ModelError(InputError):
    """A model that cannot be loaded; the message names the spec field. Retrying cannot help."""


def go_offline(settings: Latents) -> None:
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


def _fail(field: str, name: str, err: BaseException) -> ModelError:
    return ModelError(
        f"spec.latents.{field}: cannot load {name!r}: {type(err).__name__}: "
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


def load(settings: Latents):
    """(device, vae, text encoder), kept for the next shard this Ray worker encodes with the same models."""
    key = (
        settings.vae,
        settings.vae_subfolder,
        settings.text_encoder,
        settings.text_encoder_subfolder,
        settings.tokenizer_subfolder,
        settings.dtype,
    )
    if key not in _CACHE:
        go_offline(settings)
        device = pick_device()
        _CACHE.clear()  # one set of models in memory at a time
        _CACHE[key] = (device, load_vae(settings, device), load_text_encoder(settings, device))
    return _CACHE[key]
