"""The default cursor: a 32x32 ALPHA arrow (brief §7.2).

In client mouse mode the client draws the pointer with the shape we send, and a cursor INIT
without an image would hide it, so a visible arrow is always sent.
"""

from __future__ import annotations

import struct

import numpy as np

from ..protocol.constants import CURSOR_TYPE_ALPHA

CURSOR_HEADER = struct.Struct("<HQBHHHH")  # flags, unique id, type, width, height, hot x, hot y
SIZE = 32


def arrow_pixels(size: int = SIZE) -> np.ndarray:
    """(size, size, 4) BGRA arrow: white fill, black outline, straight alpha."""
    y, x = np.mgrid[0:size, 0:size]
    height = size * 3 // 4
    # The classic arrow: a triangle whose left edge is vertical and whose right edge falls
    # at 45 degrees, plus a short tail.
    body = (x <= y) & (y < height) & (x < height - (y - x) // 3 + 1)
    tail = (y >= height // 2) & (y < size - 2) & (x >= y // 2) & (x <= y // 2 + 3) & (x <= y)
    shape = body | tail
    inner = np.zeros_like(shape)
    inner[1:-1, 1:-1] = shape[1:-1, 1:-1] & shape[:-2, 1:-1] & shape[2:, 1:-1] & shape[1:-1, :-2] & shape[1:-1, 2:]
    pixels = np.zeros((size, size, 4), np.uint8)
    pixels[shape] = (0, 0, 0, 255)
    pixels[inner] = (255, 255, 255, 255)
    return pixels


def cursor_bytes(pixels: np.ndarray, hot_x: int, hot_y: int, unique: int) -> bytes:
    """A SPICE Cursor structure for an (h, w, 4) BGRA image with straight alpha."""
    h, w = pixels.shape[:2]
    header = CURSOR_HEADER.pack(0, unique, CURSOR_TYPE_ALPHA, w, h, hot_x, hot_y)
    return header + np.ascontiguousarray(pixels, np.uint8).tobytes()


def default_cursor() -> bytes:
    return cursor_bytes(arrow_pixels(), 0, 0, 1)
