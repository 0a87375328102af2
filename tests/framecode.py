"""Frame numbers painted into the picture and read back off a real client's screen.

A moving picture is only proof when the test knows *which* frame a screenshot shows: then
the position of everything in it can be computed from that frame number and compared, and
"it moved" means "later frames were shown", whatever the timing of the screenshots.

The code is a row of CELLS square cells, black for 0 and white for 1: the frame number's low
BITS bits, then a 4-bit check. Cells are big (16 px) so that lossy codecs and scaling keep
their centres clean; a cell whose centre is neither clearly dark nor clearly light, or a
failed check, reads as None (a torn or half-drawn picture), never as a wrong number.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

BITS = 12
CHECK_BITS = 4
CELLS = BITS + CHECK_BITS
CELL = 16
WIDTH, HEIGHT = CELLS * CELL, CELL
MODULUS = 1 << BITS


def _check(k: int) -> int:
    k &= MODULUS - 1
    return (k ^ (k >> 4) ^ (k >> 8) ^ 0b1010) & 0xF


def _bits(k: int) -> list[int]:
    k &= MODULUS - 1
    value = k | (_check(k) << BITS)
    return [(value >> i) & 1 for i in range(CELLS)]


def paint(frame: np.ndarray, k: int, x: int, y: int) -> None:
    """Paint frame number `k` into a BGRX/BGR `frame` with its top-left corner at (x, y)."""
    for i, bit in enumerate(_bits(k)):
        frame[y : y + CELL, x + i * CELL : x + (i + 1) * CELL, :3] = 255 if bit else 0


def read(shot: np.ndarray, to_screen: Callable[[float, float], tuple[float, float]], x: int, y: int) -> int | None:
    """The frame number (mod MODULUS) painted at surface (x, y), from an RGB screenshot; None
    when the code is not cleanly readable. `to_screen` maps surface to screen coordinates."""
    value = 0
    for i in range(CELLS):
        sx, sy = to_screen(x + i * CELL + CELL / 2, y + CELL / 2)
        cx, cy = int(round(sx)), int(round(sy))
        if not (2 <= cy < shot.shape[0] - 2 and 2 <= cx < shot.shape[1] - 2):
            return None
        level = float(shot[cy - 2 : cy + 3, cx - 2 : cx + 3].astype(np.float32).mean())
        if level >= 170:
            value |= 1 << i
        elif level > 85:
            return None
    k = value & (MODULUS - 1)
    return k if value >> BITS == _check(k) else None

