"""Decode the image payloads spicestream sends (BITMAP 32-bit, LZ4), as a client would."""

from __future__ import annotations


import lz4.block
import numpy as np

from ..display.images import BITMAP_HEADER, IMAGE_DESCRIPTOR, LZ4_BLOCK_SIZE, LZ4_HEADER
from ..protocol.constants import BITMAP_TOP_DOWN, BitmapFormat, ImageType

LZ4_DICT_BYTES = 64 << 10  # an LZ4 block may refer back this far into earlier output


def decode_image(data: bytes) -> np.ndarray:
    """ImageDescriptor + payload -> (h, w, 4) uint8 BGRx, top row first."""
    _id, kind, _flags, width, height = IMAGE_DESCRIPTOR.unpack_from(data)
    body = data[IMAGE_DESCRIPTOR.size :]
    if kind == ImageType.BITMAP:
        fmt, flags, x, y, stride, _palette = BITMAP_HEADER.unpack_from(body)
        if fmt not in (BitmapFormat.BGRX32, BitmapFormat.BGRA32) or (x, y) != (width, height):
            raise ValueError(f"unsupported bitmap format {fmt} {x}x{y}")
        rows = np.frombuffer(body, np.uint8, stride * y, BITMAP_HEADER.size).reshape(y, stride)
        pixels = rows[:, : x * 4].reshape(y, x, 4)
        top_down = bool(flags & BITMAP_TOP_DOWN)
    elif kind == ImageType.LZ4:
        data_size, top_down, fmt = LZ4_HEADER.unpack_from(body)
        end = 4 + data_size
        pos, out = LZ4_HEADER.size, b""
        expected = width * height * 4
        while pos < end:
            (size,) = LZ4_BLOCK_SIZE.unpack_from(body, pos)
            block = body[pos + 4 : pos + 4 + size]
            out += lz4.block.decompress(block, uncompressed_size=expected - len(out),
                                        dict=out[-LZ4_DICT_BYTES:])
            pos += 4 + size
        if fmt != BitmapFormat.BGRX32 or len(out) != expected:
            raise ValueError(f"LZ4 image: format {fmt}, {len(out)} of {expected} bytes")
        pixels = np.frombuffer(out, np.uint8).reshape(height, width, 4)
    else:
        raise ValueError(f"unsupported image type {kind}")
    return pixels if top_down else pixels[::-1]


__all__ = ["decode_image"]
