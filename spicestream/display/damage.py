"""Damage as a grid of dirty tiles.

A client's pending damage is a boolean grid, one cell per TILE x TILE pixels: merging new
damage is an OR, memory is fixed by the surface size whatever the client's speed, and turning
the grid back into a few rectangles is a short loop over tile rows.
"""

from __future__ import annotations

import numpy as np

TILE = 64
MAX_RECTS = 32  # past this, one bounding box costs less than many small messages


def grid_shape(width: int, height: int) -> tuple[int, int]:
    return (-(-height // TILE), -(-width // TILE))


class TileGrid:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.cells = np.zeros(grid_shape(width, height), dtype=bool)

    def __bool__(self) -> bool:
        return bool(self.cells.any())

    def add_rect(self, x: int, y: int, w: int, h: int) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 > x0 and y1 > y0:
            self.cells[y0 // TILE : -(-y1 // TILE), x0 // TILE : -(-x1 // TILE)] = True

    def add_all(self) -> None:
        self.cells[:] = True

    def add_grid(self, cells: np.ndarray) -> None:
        self.cells |= cells

    def take_rects(self) -> list[tuple[int, int, int, int]]:
        """Return the dirty area as (x, y, w, h) rectangles clipped to the surface; clear."""
        rects = cells_to_rects(self.cells, self.width, self.height)
        self.cells[:] = False
        return rects


def cells_to_rects(cells: np.ndarray, width: int, height: int) -> list[tuple[int, int, int, int]]:
    # Horizontal runs per tile row, then runs with the same span in consecutive rows merge.
    spans: dict[tuple[int, int], tuple[int, int]] = {}  # (c0, c1) -> (first row, last row)
    done: list[tuple[int, int, int, int]] = []  # (c0, c1, r0, r1) in tiles
    for r in np.flatnonzero(cells.any(axis=1)):
        row = np.concatenate(([False], cells[r], [False]))
        edges = np.flatnonzero(row[1:] != row[:-1])
        current = {(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])}
        for span in list(spans):
            first, last = spans[span]
            if span not in current or last != r - 1:
                done.append((*span, first, last + 1))
                del spans[span]
        for span in current:
            first, _ = spans.get(span, (r, r))
            spans[span] = (first, r)
    done += [(*span, first, last + 1) for span, (first, last) in spans.items()]
    if len(done) > MAX_RECTS:
        done = [(min(d[0] for d in done), max(d[1] for d in done),
                 min(d[2] for d in done), max(d[3] for d in done))]
    rects = []
    for c0, c1, r0, r1 in done:
        x, y = c0 * TILE, r0 * TILE
        rects.append((x, y, min(width, c1 * TILE) - x, min(height, r1 * TILE) - y))
    return rects


def diff_tiles(frame: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Grid of tiles where `frame` differs from `previous` (both (H, W, 4) uint8)."""
    h, w = frame.shape[:2]
    # Compare pixels as u32 where the layout allows it: a quarter of the element work.
    if frame.strides[1:] == (4, 1) and previous.strides[1:] == (4, 1):
        changed = frame.view(np.uint32)[..., 0] != previous.view(np.uint32)[..., 0]
    else:
        changed = (frame != previous).any(axis=2)
    rows = np.logical_or.reduceat(changed, np.arange(0, h, TILE), axis=0)
    return np.logical_or.reduceat(rows, np.arange(0, w, TILE), axis=1)
