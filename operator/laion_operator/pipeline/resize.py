"""Resizing one image: img2dataset's Resizer, faster, and optionally at reduced size (`download.reducedDecode`).

`Resizer` gives the same bytes as img2dataset's for every input, for less CPU, which is where a download
spends its time:
- JPEGs are decoded by libjpeg-turbo's own API (simplejpeg): the same pixels as OpenCV's `imdecode`
  in about 80 % of its time;
- the resize, crop and border steps call OpenCV directly instead of building albumentations
  transforms per image.
Anything this path does not cover — skip_reencode, blurring, CMYK, 12-bit, lossless or damaged JPEGs,
images that fail a size check — goes to img2dataset's own `__call__`, so errors read the same.

With `reduced_decode`, libjpeg's DCT scaling decodes a JPEG at 1/2, 1/4 or 1/8 of its size when the
resize target is at most half the source: the largest of those scales that still leaves the image at
least as large as the target, then resized to exactly the size a full decode would be resized to.
The output differs from a full decode's by resampling only: `tests/pipeline/test_resize.py` holds it to a PSNR
of at least 35 dB.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg
from img2dataset import resizer as i2d

from .image_header import jpeg_frame

ResizeMode = i2d.ResizeMode

# Frame headers: baseline, extended and progressive Huffman JPEGs are what libjpeg decodes scaled.
_SCALABLE_SOF = {0xC0, 0xC1, 0xC2}
_SHORT_SIDE = (ResizeMode.keep_ratio, ResizeMode.center_crop)
_LONG_SIDE = (ResizeMode.border, ResizeMode.keep_ratio_largest)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of an 8-bit Huffman JPEG, or None for anything else."""
    frame = jpeg_frame(data)
    if frame is None or frame.marker not in _SCALABLE_SOF or frame.precision != 8 or frame.components is None:
        return None
    return frame.width, frame.height, frame.components


class Resizer(i2d.Resizer):
    """img2dataset's Resizer with the same output for less work; `reduced_decode` trades exactness for speed."""

    def __init__(self, *args, reduced_decode: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.reduced_decode = reduced_decode

    def side(self, width: int, height: int) -> int | None:
        """The side of a width x height image the resize mode scales to image_size; None: no resizing."""
        if self.resize_mode in _SHORT_SIDE:
            return min(width, height)
        if self.resize_mode in _LONG_SIDE:
            return max(width, height)
        return None

    def target(self, width: int, height: int) -> tuple[int, int] | None:
        """(height, width) the resize step gives a width x height image, or None when it does not resize."""
        side = self.side(width, height)
        if side is None or (self.resize_only_if_bigger and side <= self.image_size):
            return None
        # The rounding of albumentations' SmallestMaxSize / LongestMaxSize, which the parent uses.
        scale = self.image_size / side
        return max(1, round(height * scale)), max(1, round(width * scale))

    def denominator(self, width: int, height: int) -> int:
        """The DCT scaling (1, 2, 4 or 8) a width x height JPEG is decoded at."""
        target = self.target(width, height) if self.reduced_decode else None
        if target is None or self.side(width, height) < 2 * self.image_size:
            return 1
        for denominator in (8, 4, 2):
            if -(-width // denominator) >= target[1] and -(-height // denominator) >= target[0]:
                return denominator
        return 1

    def refusal(self, width: int, height: int) -> str | None:
        """The parent's message for an image its size checks refuse."""
        if min(width, height) < self.min_image_size:
            return "image too small"
        if width * height > self.max_image_area:
            return "image area too large"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            return "aspect ratio too large"
        return None

    def decode_jpeg(self, data: bytes) -> tuple[np.ndarray, int, int] | None:
        """(pixels, original width, original height) of a JPEG this path decodes, else None."""
        header = jpeg_header(data)
        if header is None or header[2] not in (1, 3) or self.refusal(header[0], header[1]):
            return None
        width, height, components = header
        denominator = self.denominator(width, height)
        shape = (-(-height // denominator), -(-width // denominator))
        try:
            img = simplejpeg.decode_jpeg(
                data, "GRAY" if components == 1 else "BGR", strict=True, min_height=shape[0], min_width=shape[1]
            )
        except ValueError:  # damaged: the parent decodes what it can, or reports it
            return None
        if img.shape[:2] != shape:
            return None
        return (img.reshape(shape) if components == 1 else img), width, height

    def __call__(self, img_stream, blurring_bbox_list=None):
        if self.disable_all_reencoding or self.skip_reencode or blurring_bbox_list is not None:
            return super().__call__(img_stream, blurring_bbox_list)
        img_stream.seek(0)
        data = img_stream.read()
        try:
            decoded = self.decode_jpeg(data)
            if decoded is None:
                if data[:3] == b"\xff\xd8\xff":
                    return super().__call__(img_stream)
                img = self.decode_other(data)
                if img is None:
                    return super().__call__(img_stream)  # the parent reports the decoding error
                height, width = img.shape[:2]
                refusal = self.refusal(width, height)
                if refusal:
                    return None, None, None, None, None, refusal
            else:
                img, width, height = decoded
            img = self.resize(img, width, height)
            encoded = cv2.imencode(f".{self.encode_format}", img, params=self.encode_params)[1].tobytes()
            return encoded, img.shape[1], img.shape[0], width, height, None
        except Exception as err:  # noqa: BLE001 - as the parent: a bad image is a sample's failure
            return None, None, None, None, None, str(err)

    def decode_other(self, data: bytes) -> np.ndarray | None:
        """PNG, WebP, … decoded as the parent does, alpha matted onto white."""
        with i2d.SuppressStdoutStderr():
            cv2.setNumThreads(1)
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is not None and img.ndim == 3 and img.shape[-1] == 4:
            alpha = img[:, :, 3, np.newaxis]
            img = alpha / 255 * img[..., :3] + 255 - alpha
            img = np.rint(img.clip(min=0, max=255)).astype(np.uint8)
        return img

    def resize(self, img: np.ndarray, width: int, height: int) -> np.ndarray:
        """The parent's resize, crop and border steps for an image whose original size is width x height."""
        target = self.target(width, height)
        if target is None:
            return img
        cv2.setNumThreads(1)
        if img.shape[:2] != target:
            downscale = self.side(width, height) > self.image_size
            img = cv2.resize(
                img,
                target[::-1],
                interpolation=self.downscale_interpolation if downscale else self.upscale_interpolation,
            )
        size, (h, w) = self.image_size, target
        if self.resize_mode == ResizeMode.center_crop:
            y, x = max(h - size, 0) // 2, max(w - size, 0) // 2
            img = img[y : y + size, x : x + size]
        elif self.resize_mode == ResizeMode.border and (h < size or w < size):
            top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
            img = cv2.copyMakeBorder(
                img,
                top,
                max(size - h, 0) - top,
                left,
                max(size - w, 0) - left,
                cv2.BORDER_CONSTANT,
                value=[255, 255, 255],
            )
        return img
