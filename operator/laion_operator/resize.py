"""Reduced-size JPEG decoding in front of img2dataset's Resizer (`spec.download.reducedDecode`).

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling) for much less work than a full
decode, and the smaller image is then cheaper to resize. When the resize target is at most half the
source, `ReducedDecodeResizer` decodes at the largest of those scales that still leaves the image at
least as large as the target, and resizes it to exactly the size a full decode would be resized to.

Everything else is img2dataset's `Resizer` unchanged: the size, area and aspect-ratio checks and
`original_width/height` use the original dimensions (read from the JPEG's frame header), centre crop,
white border and encoding are the same, and every other input — PNG, WebP, CMYK or 12-bit JPEGs,
images that fail a check, images the target is not at most half of — goes through the parent's full
decode. The output differs from a full decode's by resampling only: `tests/test_resize.py` holds it
to a PSNR of at least 35 dB.
"""

from __future__ import annotations

import cv2
import numpy as np
from img2dataset.resizer import ResizeMode, Resizer, SuppressStdoutStderr

# Frame headers: baseline, extended and progressive Huffman JPEGs are what libjpeg decodes scaled.
_SCALABLE_SOF = {0xC0, 0xC1, 0xC2}
_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field
# (denominator, grayscale) -> imdecode flags. EXIF orientation is ignored, as IMREAD_UNCHANGED does;
# denominator 1 (a full decode) is never planned, tests use it to compare the rest of the path.
_FLAGS = {
    (1, False): cv2.IMREAD_COLOR, (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4, (8, False): cv2.IMREAD_REDUCED_COLOR_8,
    (1, True): cv2.IMREAD_GRAYSCALE, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of an 8-bit Huffman JPEG, or None for anything else."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in _SCALABLE_SOF:
            if i + 10 > n or data[i + 4] != 8:
                return None
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height, data[i + 9]) if width and height else None
        if marker in _OTHER_SOF or marker in (0xDA, 0xD9):  # lossless/arithmetic, or a scan before any frame
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


class ReducedDecodeResizer(Resizer):
    """img2dataset's Resizer that decodes large JPEGs at 1/2, 1/4 or 1/8 scale when the target allows."""

    def plan(self, width: int, height: int) -> tuple[int, int, int] | None:
        """(denominator, target height, target width) for a reduced decode of a width x height image."""
        if self.resize_mode in (ResizeMode.keep_ratio, ResizeMode.center_crop):
            side = min(width, height)
        elif self.resize_mode in (ResizeMode.border, ResizeMode.keep_ratio_largest):
            side = max(width, height)
        else:
            return None
        if side < 2 * self.image_size:
            return None
        if min(width, height) < self.min_image_size or width * height > self.max_image_area or \
                max(width, height) / min(width, height) > self.max_aspect_ratio:
            return None  # the parent's full decode fails it with its own message
        # The size albumentations' SmallestMaxSize / LongestMaxSize give the full-size image.
        scale = self.image_size / side
        target_h, target_w = max(1, round(height * scale)), max(1, round(width * scale))
        for denominator in (8, 4, 2):
            if -(-width // denominator) >= target_w and -(-height // denominator) >= target_h:
                return denominator, target_h, target_w
        return None

    def __call__(self, img_stream, blurring_bbox_list=None):
        if self.disable_all_reencoding or blurring_bbox_list is not None:
            return super().__call__(img_stream, blurring_bbox_list)
        img_stream.seek(0)
        data = img_stream.read()
        header = jpeg_header(data)
        plan = self.plan(header[0], header[1]) if header and header[2] in (1, 3) else None
        if plan is None:
            return super().__call__(img_stream)
        width, height, components = header
        denominator, target_h, target_w = plan
        try:
            with SuppressStdoutStderr():
                cv2.setNumThreads(1)
                img = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS[denominator, components == 1]
                                   | cv2.IMREAD_IGNORE_ORIENTATION)
                if img is None or img.shape[:2] != (-(-height // denominator), -(-width // denominator)):
                    return super().__call__(img_stream)  # the parent reports the decoding error
                img = cv2.resize(img, (target_w, target_h), interpolation=self.downscale_interpolation)
                # From here on the parent's steps on an image already at its resized size.
                if self.resize_mode == ResizeMode.center_crop:
                    y, x = (target_h - self.image_size) // 2, (target_w - self.image_size) // 2
                    img = img[y:y + self.image_size, x:x + self.image_size]
                elif self.resize_mode == ResizeMode.border:
                    top, left = (self.image_size - target_h) // 2, (self.image_size - target_w) // 2
                    img = cv2.copyMakeBorder(img, top, self.image_size - target_h - top, left,
                                             self.image_size - target_w - left, cv2.BORDER_CONSTANT,
                                             value=[255, 255, 255])
                out_h, out_w = img.shape[:2]
                encoded = cv2.imencode(f".{self.encode_format}", img, params=self.encode_params)[1].tobytes()
                return encoded, out_w, out_h, width, height, None
        except Exception as err:  # noqa: BLE001 - as the parent: a bad image is a sample's failure
            return None, None, None, None, None, str(err)
