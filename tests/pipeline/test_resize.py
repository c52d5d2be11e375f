"""Resizing: byte for byte img2dataset's Resizer, faster; with reducedDecode, close to it (PSNR ≥ 35 dB)."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
import simplejpeg
from img2dataset import resizer as i2d
from PIL import Image

from laion_operator.pipeline import resize
from laion_operator.pipeline.record import make_resizer
from laion_operator.pipeline.resize import Resizer, jpeg_header
from laion_operator.spec import PartSpec
from laion_operator.testbed.fakeweb import Spec, encode, render

MODES = ["keep_ratio", "center_crop", "border", "keep_ratio_largest", "no"]


def options(**extra) -> dict:
    return {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": False, **extra}


def saved(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def jpeg(w: int, h: int, name: str = "r", **save) -> bytes:
    if not save:
        return encode(Spec(f"{name}{w}x{h}", w, h, "jpg"))
    return saved(render(Spec(f"{name}{w}x{h}", w, h, "jpg")), "JPEG", **save)


def inputs() -> dict[str, bytes]:
    """What the web serves: JPEGs large and small, grey, progressive, rotated, CMYK; PNG with and without
    alpha; WebP; damaged and non-image bytes."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: IMREAD_UNCHANGED ignores it, so must we
    rgba = render(Spec("alpha", 900, 700, "png")).convert("RGBA")
    rgba.putalpha(128)
    photo = render(Spec("p", 2100, 1100, "jpg"))
    return {
        "jpeg-large": jpeg(1600, 1100),
        "jpeg-small": jpeg(400, 300),
        "jpeg-tall": jpeg(600, 1400),
        "jpeg-exact": jpeg(512, 700),
        "jpeg-444": jpeg(1000, 800, subsampling=0, quality=92),
        "jpeg-grey": saved(photo.convert("L"), "JPEG", quality=90),
        "jpeg-progressive": saved(photo, "JPEG", progressive=True, quality=85),
        "jpeg-exif": saved(photo, "JPEG", exif=exif.tobytes(), quality=85),
        "jpeg-cmyk": saved(photo.convert("CMYK"), "JPEG"),
        "png": encode(Spec("png", 1200, 800, "png")),
        "png-alpha": saved(rgba, "PNG"),
        "png-grey": saved(photo.convert("L"), "PNG"),
        "webp": encode(Spec("webp", 800, 1200, "webp")),
        "jpeg-truncated": jpeg(1600, 1100)[:20000],
        "jpeg-garbage": jpeg(1600, 1100)[:600] + b"\x00" * 64,
        "html": b"<html>not an image</html>",
    }


INPUTS = inputs()


@pytest.fixture
def decoders(monkeypatch):
    """Which decoder saw each call: ('simplejpeg', (min_width, min_height)) or ('opencv', flags)."""
    seen = []
    real_cv, real_sj = cv2.imdecode, simplejpeg.decode_jpeg

    def cv(buf, flags):
        seen.append(("opencv", flags))
        return real_cv(buf, flags)

    def sj(data, colorspace="rgb", **kw):
        seen.append(("simplejpeg", (kw.get("min_width", 0), kw.get("min_height", 0))))
        return real_sj(data, colorspace, **kw)

    monkeypatch.setattr(cv2, "imdecode", cv)
    monkeypatch.setattr(resize.simplejpeg, "decode_jpeg", sj)
    return seen


@pytest.mark.parametrize(
    "mode, only_bigger, encode_format, quality",
    [
        *[(mode, only_bigger, "jpg", 95) for mode in MODES for only_bigger in (False, True)],
        *[
            (mode, False, fmt, quality)
            for mode in ("keep_ratio", "border")
            for fmt, quality in (("png", 3), ("webp", 80))
        ],
    ],
)
def test_same_bytes_as_img2dataset(mode, only_bigger, encode_format, quality):
    opts = options(
        resize_mode=mode, resize_only_if_bigger=only_bigger, encode_format=encode_format, encode_quality=quality
    )
    ours, theirs = Resizer(**opts), i2d.Resizer(**opts)
    for name, data in INPUTS.items():
        assert ours(io.BytesIO(data)) == theirs(io.BytesIO(data)), name


@pytest.mark.parametrize(
    "extra",
    [
        {"min_image_size": 1101},
        {"max_aspect_ratio": 1.4},
        {"max_image_area": 2100 * 1100 - 1},
        {"image_size": 256, "resize_mode": "border"},
        {"downscale_interpolation": "cubic"},
        {"upscale_interpolation": "linear"},
        {"skip_reencode": True},
    ],
)
def test_same_bytes_as_img2dataset_with_other_options(extra):
    ours, theirs = Resizer(**options(**extra)), i2d.Resizer(**options(**extra))
    for name, data in INPUTS.items():
        assert ours(io.BytesIO(data)) == theirs(io.BytesIO(data)), name


def test_jpegs_skip_opencv_and_the_rest_use_it(decoders):
    ours = Resizer(**options())
    for name in ["jpeg-large", "jpeg-small", "jpeg-grey", "jpeg-progressive", "jpeg-exif", "png", "webp"]:
        decoders.clear()
        assert ours(io.BytesIO(INPUTS[name]))[5] is None
        kind = "simplejpeg" if name.startswith("jpeg") else "opencv"
        assert [d[0] for d in decoders] == [kind], name
    decoders.clear()
    ours(io.BytesIO(INPUTS["jpeg-cmyk"]))
    assert [d[0] for d in decoders] == ["opencv"], "a CMYK JPEG is the parent's"


def test_checks_refuse_before_decoding(decoders):
    data = jpeg(3000, 1400)
    for extra, message in [
        ({"min_image_size": 1401}, "image too small"),
        ({"max_aspect_ratio": 2.1}, "aspect ratio too large"),
        ({"max_image_area": 3000 * 1400 - 1}, "image area too large"),
    ]:
        for reduced in (False, True):
            assert Resizer(**options(**extra), reduced_decode=reduced)(io.BytesIO(data)) == (None,) * 5 + (message,)


def decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float64)


def psnr(a: bytes, b: bytes) -> float:
    mse = np.mean((decoded(a) - decoded(b)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("mode", MODES[:4])
@pytest.mark.parametrize(
    "size, image_size, denominator",
    [
        ((1100, 1030), 512, 2),
        ((1600, 1200), 512, 2),
        ((1200, 2200), 512, 2),
        ((2000, 1500), 256, 4),
        ((2100, 2100), 256, 8),
        ((1000, 900), 512, 1),
    ],
)
def test_reduced_decode_is_close_to_full_decode(decoders, mode, size, image_size, denominator):
    w, h = size
    full = Resizer(**options(image_size=image_size, resize_mode=mode))
    reduced = Resizer(**options(image_size=image_size, resize_mode=mode), reduced_decode=True)
    side = min(w, h) if mode in ("keep_ratio", "center_crop") else max(w, h)
    expected = reduced.denominator(w, h)
    if mode in ("keep_ratio", "center_crop"):
        assert expected == denominator
    if side < 2 * image_size:
        assert expected == 1
    data = jpeg(w, h)
    want = full(io.BytesIO(data))
    decoders.clear()
    got = reduced(io.BytesIO(data))
    assert got[5] is None and want[5] is None
    assert got[1:] == want[1:], "same output size and the original size of the image"
    assert got[3:5] == (w, h)
    assert decoders == [("simplejpeg", (math.ceil(w / expected), math.ceil(h / expected)))]
    assert psnr(got[0], want[0]) >= 35
    if expected == 1:
        assert got == want


def test_reduced_decode_of_the_other_inputs_is_the_full_decode():
    full, reduced = Resizer(**options()), Resizer(**options(), reduced_decode=True)
    for name, data in INPUTS.items():
        want = full(io.BytesIO(data))
        got = reduced(io.BytesIO(data))
        if name in ("jpeg-large", "jpeg-progressive", "jpeg-exif", "jpeg-grey"):
            assert got[1:] == want[1:] and psnr(got[0], want[0]) >= 35, name
            assert got[0] != want[0], f"{name} was decoded at reduced size"
        else:
            assert got == want, name


def test_grayscale_jpeg_stays_grayscale():
    data = saved(render(Spec("gray", 2048, 1536, "jpg")).convert("L"), "JPEG", quality=90)
    want = i2d.Resizer(**options())(io.BytesIO(data))
    got = Resizer(**options(), reduced_decode=True)(io.BytesIO(data))
    assert got[1:] == want[1:]
    assert decoded(got[0]).ndim == decoded(want[0]).ndim == 2
    assert psnr(got[0], want[0]) >= 35


def test_jpeg_header_matches_pil():
    for save in ({}, {"progressive": True}, {"subsampling": 0}):
        data = jpeg(1234, 567, **save) if save else jpeg(1234, 567)
        assert jpeg_header(data) == (1234, 567, 3)
        assert Image.open(io.BytesIO(data)).size == (1234, 567)
    assert jpeg_header(encode(Spec("p", 64, 64, "png"))) is None
    assert jpeg_header(b"\xff\xd8\xff") is None
    assert jpeg_header(b"") is None


def test_spec_option_chooses_the_decode(tmp_path):
    base = {"partId": "r", "source": {"urls": ["m.parquet"]}, "output": {"uri": str(tmp_path)}}
    assert make_resizer(PartSpec.from_dict(base).download).reduced_decode is False
    spec = PartSpec.from_dict({**base, "download": {"reducedDecode": True}})
    assert spec.download.reduced_decode is True
    assert make_resizer(spec.download).reduced_decode is True
    assert spec.to_dict()["download"]["reducedDecode"] is True


def test_spec_interpolations_reach_the_resizer(tmp_path):
    base = {"partId": "r", "source": {"urls": ["m.parquet"]}, "output": {"uri": str(tmp_path)}}
    download = {
        "imageSize": 512,
        "resizeMode": "keep_ratio",
        "downscaleInterpolation": "linear",
        "upscaleInterpolation": "cubic",
    }
    ours = make_resizer(PartSpec.from_dict({**base, "download": download}).download)
    theirs = i2d.Resizer(**options(downscale_interpolation="linear", upscale_interpolation="cubic"))
    default = i2d.Resizer(**options())
    for name in ("jpeg-large", "jpeg-small"):  # one shrinks, one grows
        got = ours(io.BytesIO(INPUTS[name]))
        assert got == theirs(io.BytesIO(INPUTS[name]))
        assert got[0] != default(io.BytesIO(INPUTS[name]))[0], f"{name}: the filter changed the pixels"
