"""Video-region detection: which part of the display keeps changing and should be a stream.

Each tile has a "heat": every update that changes it adds 1, and heat decays with a time
constant of one second, so a tile changing f times a second settles near f. A region whose
tiles run hotter than START_HEAT (several updates a second, sustained) becomes a stream; the
stream ends once its region has been still for STOP_AFTER_S. Regions are tile-aligned, so
the lossless path can leave exactly the stream's tiles alone. Modes follow spice-server's
`streaming-video`: "off", "all" (any hot region), "filter" (only regions big and colourful
enough to look like video: a ticking clock, a blinking cursor or a progress bar never are).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .damage import TILE

MODES = ("off", "all", "filter")
HEAT_TAU_S = 1.0
START_HEAT = 4.0
WARM_FRACTION = 0.5
STOP_AFTER_S = 1.0
FULL_SCREEN_FRACTION = 0.8  # a hot area this big streams the whole surface
FILTER_MIN_SIZE = (128, 96)
FILTER_MIN_COLOURS = 64  # distinct colours among sampled pixels
MAX_STREAM_ID = 64  # SPICE_MAX_NUM_STREAMS


@dataclass(frozen=True)
class StreamRegion:
    stream_id: int
    x: int
    y: int
    width: int
    height: int

    @property
    def rect(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.width, self.height)

    def tile_mask(self, width: int, height: int) -> np.ndarray:
        """Tiles whose on-surface part lies wholly inside the region (their damage is carried
        by the stream); edge tiles cut by the surface border count by their visible part."""
        rows, cols = -(-height // TILE), -(-width // TILE)
        x0 = np.arange(cols) * TILE
        x1 = np.minimum(x0 + TILE, width)
        y0 = np.arange(rows) * TILE
        y1 = np.minimum(y0 + TILE, height)
        inside_x = (x0 >= self.x) & (x1 <= self.x + self.width)
        inside_y = (y0 >= self.y) & (y1 <= self.y + self.height)
        return inside_y[:, None] & inside_x[None, :]


class StreamDetector:
    def __init__(self, mode: str, width: int, height: int):
        if mode not in MODES:
            raise ValueError(f"streaming mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.width, self.height = width, height
        self.heat = np.zeros((-(-height // TILE), -(-width // TILE)), np.float32)
        self.region: StreamRegion | None = None
        self._last_update = None
        self._last_change = 0.0
        self._settled = False  # the hot area was inside the region at the last evaluation
        self._ids = itertools.cycle(range(MAX_STREAM_ID))

    def damaged(self, cells: np.ndarray, frame: np.ndarray, now: float) -> bool:
        """Account one update's changed tiles; returns True when the region changed."""
        if self.mode == "off":
            return False
        self._decay(now)
        self.heat += cells
        if self.region is not None:
            inside = np.count_nonzero(cells[self._region_cells()])
            if inside:
                self._last_change = now
                if self._settled and inside == np.count_nonzero(cells):
                    # Heat outside the region only decayed, and the hot area was inside it at
                    # the last look: it still is, whatever heated up inside. (Every captured
                    # frame of a full-screen video lands here.)
                    return False
        return self._evaluate(frame, now)

    def tick(self, now: float) -> bool:
        """Called periodically: ends a stream whose region went still. True if it changed."""
        if self.region is not None and now - self._last_change >= STOP_AFTER_S:
            self.region, self._settled = None, False
            self.heat[:] = 0
            return True
        return False

    def _decay(self, now: float) -> None:
        if self._last_update is not None:
            self.heat *= math.exp(-max(0.0, now - self._last_update) / HEAT_TAU_S)
        self._last_update = now

    def _region_cells(self):
        r = self.region
        return (slice(r.y // TILE, -(-(r.y + r.height) // TILE)),
                slice(r.x // TILE, -(-(r.x + r.width) // TILE)))

    def _evaluate(self, frame: np.ndarray, now: float) -> bool:
        if not (self.heat >= START_HEAT).any():
            return self.tick(now)
        # Once one tile is hot, its warm neighbours belong to the same activity: taking them
        # in now avoids a small stream that is replaced by a bigger one a frame later.
        warm = self.heat >= START_HEAT * WARM_FRACTION
        rows, cols = np.flatnonzero(warm.any(axis=1)), np.flatnonzero(warm.any(axis=0))
        x, y = int(cols[0]) * TILE, int(rows[0]) * TILE
        w = min(self.width, (int(cols[-1]) + 1) * TILE) - x
        h = min(self.height, (int(rows[-1]) + 1) * TILE) - y
        if w * h >= FULL_SCREEN_FRACTION * self.width * self.height:
            x, y, w, h = 0, 0, self.width, self.height
        w, h = w - w % 2, h - h % 2  # 4:2:0 encoders need even sizes
        if w < 2 or h < 2:
            return False
        current = self.region
        if current is not None and _inside((x, y, w, h), current.rect):
            self._settled = True
            return False  # the hot area is still within the stream: keep it steady
        self._settled = False
        if self.mode == "filter" and not _looks_like_video(frame, x, y, w, h):
            return False
        self.region = StreamRegion(next(self._ids), x, y, w, h)
        self._last_change = now
        return True


def _inside(inner, outer) -> bool:
    ix, iy, iw, ih = inner
    ox, oy, ow, oh = outer
    return ox <= ix and oy <= iy and ix + iw <= ox + ow and iy + ih <= oy + oh


def _looks_like_video(frame: np.ndarray, x: int, y: int, w: int, h: int) -> bool:
    if w < FILTER_MIN_SIZE[0] or h < FILTER_MIN_SIZE[1]:
        return False
    # A 32x32 grid of samples: text and flat UI use a handful of colours, video hundreds.
    ys = np.linspace(y, y + h - 1, 32).astype(int)
    xs = np.linspace(x, x + w - 1, 32).astype(int)
    samples = frame[np.ix_(ys, xs)][..., :3].reshape(-1, 3)
    packed = samples[:, 0].astype(np.uint32) << 16 | samples[:, 1].astype(np.uint32) << 8 | samples[:, 2]
    return len(np.unique(packed)) >= FILTER_MIN_COLOURS
