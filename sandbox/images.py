"""Read an image's type and size from its header bytes, as Exchange and Business Central do on upload.

Both services look at the bytes, not at the name or the Content-Type: Graph answers a photo's
`width`/`height` and BC a picture's `width`/`height`/`contentType`. The sandbox reads the same from
the JPEG, PNG and GIF headers (the formats a contact photo comes in); anything else is "not an image".
Progressive JPEGs and CMYK are fine (only the SOF marker is read); no pixel data is decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageInfo:
    content_type: str  # "image/jpeg", "image/png" or "image/gif"
    width: int
    height: int


def image_info(data: bytes) -> ImageInfo | None:
    """The image's media type and pixel size, or None when the bytes are not a JPEG, PNG or GIF."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return ImageInfo("image/png", width, height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return ImageInfo("image/gif", width, height)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_info(data)
    return None


def _jpeg_info(data: bytes) -> ImageInfo | None:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in _JPEG_SOF:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return ImageInfo("image/jpeg", width, height)
        at += 2 + length
    return None


def make_jpeg(width: int, height: int, padding: int = 0) -> bytes:
    """A minimal JPEG-shaped byte string of the given size (header only, plus `padding` bytes of
    comment) for tests and seeding: enough for both services to read its type and dimensions."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    comment = b""
    while padding > 0:
        chunk = min(padding, 65533)
        comment += b"\xff\xfe" + struct.pack(">H", chunk + 2) + b"\x00" * chunk
        padding -= chunk
    return b"\xff\xd8" + comment + sof + b"\xff\xd9"


def make_png(width: int, height: int) -> bytes:
    """A minimal PNG-shaped byte string (signature and IHDR) of the given size."""
    ihdr = struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\x00\x00\x00\x00"
