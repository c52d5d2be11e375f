"""Reduced-size JPEG decoding: the same results as img2dataset's Resizer, up to resampling."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from img2dataset.resizer import Resizer
from PIL import Image

from laion_operator.download import make_resizer
from laion_operator.fakeweb import Spec, encode, render
from laion_operator.resize import ReducedDecodeResizer, jpeg_header
from laion_operator.spec import PartSpec

MODES = ["keep_ratio", "center_crop", "border", "keep_ratio_largest"]
REDUCED = {cv2.IMREAD_REDUCED_COLOR_2, cv2.IMREAD_REDUCED_COLOR_4, cv2.IMREAD_REDUCED_COLOR_8,
           cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_GRAYSCALE_8}


def pair(**options):
    options = {"image_size": 512, "resize_mode": "keep_ratio", "resize_only_if_bigger": False, **options}
    return Resizer(**options), ReducedDecodeResizer(**options)


def jpeg(w: int, h: int, name: str = "r", **save) -> bytes:
    if not save:
        return encode(Spec(f"{name}{w}x{h}", w, h, "jpg"))
    buf = io.BytesIO()
    render(Spec(f"{name}{w}x{h}", w, h, "jpg")).save(buf, "JPEG", **save)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float64)


def psnr(a: bytes, b: bytes) -> float:
    mse = np.mean((decoded(a) - decoded(b)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture
def decode_flags(monkeypatch):
    """The flags of every cv2.imdecode call (the parent's and ours share the cv2 module)."""
    seen = []
    real = cv2.imdecode

    def spy(buf, flags):
        seen.append(flags if flags < 0 else flags & ~cv2.IMREAD_IGNORE_ORIENTATION)  # -1: IMREAD_UNCHANGED
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size, image_size, denominator", [
    ((1100, 1030), 512, 2), ((1600, 1200), 512, 2), ((1200, 2200), 512, 2), ((2000, 1500), 256, 4),
    ((2100, 2100), 256, 8),
])
def test_reduced_decode_is_close_to_full_decode(decode_flags, mode, size, image_size, denominator):
    w, h = size
    side = min(w, h) if mode in ("keep_ratio", "center_crop") else max(w, h)
    full, reduced = pair(image_size=image_size, resize_mode=mode)
    plan = reduced.plan(w, h)
    if side < 2 * image_size:
        assert plan is None
        return
    data = jpeg(w, h)
    want = full(io.BytesIO(data))
    decode_flags.clear()
    got = reduced(io.BytesIO(data))
    assert got[5] is None and want[5] is None
    assert got[1:] == want[1:], "same output size and the original size of the image"
    assert got[3:5] == (w, h)
    assert decode_flags and all(f in REDUCED for f in decode_flags), "decoded at reduced size only"
    if mode in ("keep_ratio", "center_crop"):
        assert plan[0] == denominator
    assert psnr(got[0], want[0]) >= 35


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(1100, 1030), (1030, 2200), (2200, 1100)])
@pytest.mark.parametrize("encode_format", ["jpg", "png"])
def test_after_decoding_the_steps_are_the_parents(monkeypatch, mode, size, encode_format):
    """With a full-size decode forced into the reduced path, the output is byte for byte the parent's."""
    full, reduced = pair(resize_mode=mode, encode_format=encode_format, encode_quality=90 if encode_format == "jpg"
                         else 3)
    planned = reduced.plan(*size)
    if planned is None:
        return
    monkeypatch.setattr(reduced, "plan", lambda w, h: (1, *planned[1:]))
    data = jpeg(*size)
    assert reduced(io.BytesIO(data)) == full(io.BytesIO(data))


def test_grayscale_jpeg_stays_grayscale(decode_flags):
    buf = io.BytesIO()
    render(Spec("gray", 2048, 1536, "jpg")).convert("L").save(buf, "JPEG", quality=90)
    full, reduced = pair()
    want = full(io.BytesIO(buf.getvalue()))
    decode_flags.clear()
    got = reduced(io.BytesIO(buf.getvalue()))
    assert decode_flags == [cv2.IMREAD_REDUCED_GRAYSCALE_2]
    assert got[1:] == want[1:]
    assert decoded(got[0]).ndim == decoded(want[0]).ndim == 2
    assert psnr(got[0], want[0]) >= 35


def test_progressive_and_exif_rotated_jpegs_report_the_parents_sizes():
    img = render(Spec("exif", 2400, 1200, "jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: IMREAD_UNCHANGED ignores it, so must we
    for save in ({"progressive": True, "quality": 85}, {"exif": exif.tobytes(), "quality": 85}):
        buf = io.BytesIO()
        img.save(buf, "JPEG", **save)
        full, reduced = pair()
        want, got = full(io.BytesIO(buf.getvalue())), reduced(io.BytesIO(buf.getvalue()))
        assert got[1:] == want[1:] == (1024, 512, 2400, 1200, None)
        assert psnr(got[0], want[0]) >= 35


def test_checks_use_the_original_size(decode_flags):
    data = jpeg(3000, 1400)
    for options, message in [({"min_image_size": 1401}, "image too small"),
                             ({"max_aspect_ratio": 2.1}, "aspect ratio too large"),
                             ({"max_image_area": 3000 * 1400 - 1}, "image area too large")]:
        full, reduced = pair(**options)
        assert reduced(io.BytesIO(data)) == full(io.BytesIO(data)) == (None,) * 5 + (message,)
    full, reduced = pair(min_image_size=1400, max_aspect_ratio=3000 / 1400)
    decode_flags.clear()
    got = reduced(io.BytesIO(data))
    assert got[1:] == (1097, 512, 3000, 1400, None)
    assert decode_flags == [cv2.IMREAD_REDUCED_COLOR_2]


@pytest.mark.parametrize("spec", [Spec("png", 2048, 1536, "png"), Spec("webp", 2048, 1536, "webp"),
                                  Spec("small", 1000, 900, "jpg")])
def test_other_inputs_take_the_parents_full_decode(decode_flags, spec):
    full, reduced = pair()
    data = encode(spec)
    want = full(io.BytesIO(data))
    decode_flags.clear()
    assert reduced(io.BytesIO(data)) == want
    assert decode_flags == [cv2.IMREAD_UNCHANGED]


def test_alpha_png_cmyk_jpeg_and_no_resize_fall_back(decode_flags):
    rgba = render(Spec("alpha", 2048, 1536, "png")).convert("RGBA")
    rgba.putalpha(128)
    cmyk = render(Spec("cmyk", 2048, 1536, "jpg")).convert("CMYK")
    for img, fmt, mode in [(rgba, "PNG", "keep_ratio"), (cmyk, "JPEG", "keep_ratio"),
                           (render(Spec("no", 2048, 1536, "jpg")), "JPEG", "no")]:
        buf = io.BytesIO()
        img.save(buf, fmt)
        full, reduced = pair(resize_mode=mode)
        want = full(io.BytesIO(buf.getvalue()))
        decode_flags.clear()
        assert reduced(io.BytesIO(buf.getvalue())) == want
        assert decode_flags == [cv2.IMREAD_UNCHANGED]


def test_broken_jpeg_is_the_parents_error():
    data = jpeg(2048, 1536)
    broken = data[:600] + b"\x00" * 64
    full, reduced = pair()
    assert reduced(io.BytesIO(broken))[5] == full(io.BytesIO(broken))[5]
    assert reduced(io.BytesIO(b"<html>not an image</html>")) == full(io.BytesIO(b"<html>not an image</html>"))


def test_jpeg_header_matches_pil():
    for save in ({}, {"progressive": True}, {"subsampling": 0}):
        data = jpeg(1234, 567, **save) if save else jpeg(1234, 567)
        assert jpeg_header(data) == (1234, 567, 3)
        assert Image.open(io.BytesIO(data)).size == (1234, 567)
    assert jpeg_header(encode(Spec("p", 64, 64, "png"))) is None
    assert jpeg_header(b"\xff\xd8\xff") is None
    assert jpeg_header(b"") is None


def test_spec_option_chooses_the_resizer(tmp_path):
    base = {"partId": "r", "source": {"urls": ["m.parquet"]}, "output": {"uri": str(tmp_path)}}
    assert type(make_resizer(PartSpec.from_dict(base).download)) is Resizer
    spec = PartSpec.from_dict({**base, "download": {"reducedDecode": True}})
    assert spec.download.reduced_decode is True
    assert isinstance(make_resizer(spec.download), ReducedDecodeResizer)
    assert spec.to_dict()["download"]["reducedDecode"] is True
