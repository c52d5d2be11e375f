"""What an image's first bytes declare, read without decoding it: the fetch refuses an image whose
declared pixels are over `maxImagePixels` before reading the rest, and the resizer picks its JPEG
decode path (and DCT scale) from the frame header.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

from PIL import Image

# The pixel check is ours (download.maxImagePixels); Pillow's own warning about large images is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Start-of-frame markers, every coding: 0xC0-0xC2 are the Huffman 8/12-bit ones libjpeg decodes scaled.
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG's frame header: its SOF marker, sample precision, size and components (None when the
    data ends before that byte)."""

    marker: int
    precision: int
    width: int
    height: int
    components: int | None


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of a JPEG, found by walking its markers; None for anything else, for a scan
    before any frame, or for a frame that declares no size."""
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
        if marker in SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            if not (width and height):
                return None
            return JpegFrame(marker, data[i + 4], width, height, data[i + 9] if i + 10 <= n else None)
        if marker in (0xDA, 0xD9):
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, PNG, GIF or WebP header declares, from its first bytes; None if unknown."""
    if data[:3] == b"\xff\xd8\xff":
        frame = jpeg_frame(data)
        return (frame.width, frame.height) if frame else None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


_BOMB = re.compile(r"Image size \((\d+) pixels\)")


def declared_pixels(data: bytes) -> int | None:
    """Pixels the image in `data` declares, read from its header only (never decoded); None if unknown."""
    size = header_size(data)
    if size is None:
        try:  # other formats: Pillow's lazy open reads the header only
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
        except Image.DecompressionBombError as err:
            m = _BOMB.search(str(err))
            return int(m.group(1)) if m else None
        except Exception:  # noqa: BLE001 - not an image Pillow knows: the decoder will say so
            return None
    return size[0] * size[1]
