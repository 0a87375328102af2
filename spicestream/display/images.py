"""SPICE image payloads for DRAW_COPY (brief §5.8, §5.9): uncompressed bitmaps and LZ4.

An image is returned as a list of bytes-like parts (descriptor, then pixels) so that an
uncompressed bitmap of a full-width rectangle goes to the socket without being joined.
"""

from __future__ import annotations

import itertools
import struct

import lz4.block
import numpy as np

from ..protocol.constants import BITMAP_TOP_DOWN, BitmapFormat, ImageType

IMAGE_DESCRIPTOR = struct.Struct("<QBBII")  # id, type, flags, width, height
BITMAP_HEADER = struct.Struct("<BBIIII")  # format, flags, x, y, stride, palette offset
LZ4_HEADER = struct.Struct("<IBB")  # data_size, top_down, bitmap format
LZ4_BLOCK_SIZE = struct.Struct(">I")  # block sizes are big-endian (brief §5.9)
LZ4_MIN_PIXELS = 64 * 64  # below this, compression saves less than it costs

_ids = itertools.count(1)


def pixels_of(frame: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The rectangle as a C-contiguous (h, w, 4) array: a view when rows are contiguous,
    otherwise one copy of the rectangle (the wire needs tight rows either way)."""
    return np.ascontiguousarray(frame[y : y + h, x : x + w])


def bitmap_image(pixels: np.ndarray) -> list:
    h, w = pixels.shape[:2]
    head = IMAGE_DESCRIPTOR.pack(next(_ids), ImageType.BITMAP, 0, w, h) + BITMAP_HEADER.pack(
        BitmapFormat.BGRX32, BITMAP_TOP_DOWN, w, h, w * 4, 0
    )
    return [head, memoryview(pixels).cast("B")]


def lz4_image(pixels: np.ndarray) -> list:
    h, w = pixels.shape[:2]
    block = lz4.block.compress(memoryview(pixels).cast("B"), store_size=False)
    data_size = 2 + LZ4_BLOCK_SIZE.size + len(block)
    head = (
        IMAGE_DESCRIPTOR.pack(next(_ids), ImageType.LZ4, 0, w, h)
        + LZ4_HEADER.pack(data_size, 1, BitmapFormat.BGRX32)
        + LZ4_BLOCK_SIZE.pack(len(block))
    )
    return [head, block]


def encode_image(pixels: np.ndarray, lz4_ok: bool) -> list:
    """Best lossless encoding of `pixels` the client can decode."""
    if lz4_ok and pixels.shape[0] * pixels.shape[1] >= LZ4_MIN_PIXELS:
        return lz4_image(pixels)
    return bitmap_image(pixels)
