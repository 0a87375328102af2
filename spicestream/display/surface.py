"""The display model: the application's latest frame, and what each client still needs.

`Display.update` may be called from any thread. It keeps a reference to the frame (no copy),
works out damage (given, or found by comparing tiles with a shadow of the last frame), ORs it
into every client's `ClientView`, and calls the wake-up hook so the event loop sends it. A
slow client's damage accumulates in its fixed-size tile grid; frames are never queued, so
memory does not grow with a client's slowness. Pixels are read from the latest frame when
they are sent: the application must not draw into a frame it has passed to `update` (pass a
new array, or alternate between two) or a client may see a half-drawn picture.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Callable

import numpy as np

from .damage import TileGrid, diff_tiles
from .framerate import FrameRate
from .scanout import DrawTracker, Scanout, ScanoutError
from .streams import StreamDetector, StreamRegion

Rect = tuple[int, int, int, int]
GRID_CACHE = 8  # damage patterns whose tile grids are kept


class ClientView:
    """One client's pending work on a display; touched under the display's lock."""

    def __init__(self, display: "Display"):
        self.display = display
        self.damage = TileGrid(display.width, display.height)
        self.damage.add_all()
        self.surface_size: tuple[int, int] | None = None  # size of the surface the client has
        self.stream_mask: np.ndarray | None = None  # tiles this client receives as video

    def new_surface(self) -> tuple[int, int] | None:
        """The display's size if the client's surface is stale (then everything is damaged)."""
        with self.display.lock:
            size = (self.display.width, self.display.height)
            if self.surface_size == size:
                return None
            self.surface_size = size
            self.stream_mask = None
            self.damage.add_all()
            return size

    def take(self) -> tuple[np.ndarray, list[Rect]]:
        """Return (frame, rects) and clear the pending damage.

        Damage on tiles carried by the client's video stream is dropped here: the stream's
        next frame covers it."""
        with self.display.lock:
            if self.stream_mask is not None:
                self.damage.cells &= ~self.stream_mask
            return self.display.frame, self.damage.take_rects()

    @property
    def pending(self) -> bool:
        with self.display.lock:
            if self.surface_size != (self.display.width, self.display.height):
                return True
            cells = self.damage.cells
            if self.stream_mask is not None:
                return bool((cells & ~self.stream_mask).any())
            return bool(cells.any())


class Display:
    def __init__(self, width: int = 1024, height: int = 768, streaming: str = "filter"):
        self.lock = threading.Lock()
        self.views: list[ClientView] = []
        self.wake: Callable[[], None] = lambda: None  # set by the server: schedules a send
        self.frames = 0  # generation of `frame`: bumps on every update
        self.frame_time = time.monotonic()  # when `frame` was published
        self.rate = FrameRate()  # of updates and scanout draws
        self.streaming = streaming
        self.scanout: Scanout | None = None  # a GPU scanout replaces `frame` while it is set
        self.scanout_region: StreamRegion | None = None
        self.draws = DrawTracker(lambda cookie: self.on_gl_draw_done(cookie))
        self.on_gl_draw_done: Callable[[object], None] = lambda cookie: None
        self.draw_rects: collections.deque = collections.deque(maxlen=256)  # (seq, x, y, w, h)
        self._scanout_ids = itertools.count(100)
        self._set_size(width, height)

    def _set_size(self, width: int, height: int) -> None:
        if not (0 < width <= 16384 and 0 < height <= 16384):
            raise ValueError(f"display size {width}x{height} out of range")
        self.width, self.height = width, height
        self.frame = np.zeros((height, width, 4), np.uint8)
        self._shadow: np.ndarray | None = None
        self._grids: dict[tuple, np.ndarray] = {}  # damage rectangles -> their tiles
        self.detector = StreamDetector(self.streaming, width, height)

    @property
    def fps(self) -> float:
        """The recent rate of updates (scanout draws included)."""
        return self.rate.fps

    @property
    def stream_region(self) -> StreamRegion | None:
        # A scanout is streamed whole, for as long as it exists (it never goes idle).
        return self.scanout_region or self.detector.region

    def current(self):
        """(frame, generation, publish time), consistently. With a scanout, `frame` is a
        new reference to the Scanout (the caller releases it) and `generation` its draw
        sequence number."""
        with self.lock:
            if self.scanout is not None:
                return self.scanout.acquire(), self.draws.seq, self.frame_time
            return self.frame, self.frames, self.frame_time

    # -- GPU scanouts ----------------------------------------------------------------------------
    def gl_scanout(self, fd: int, width: int, height: int, stride: int, fourcc: int,
                   y0_top: bool = True, modifier: int = 0) -> None:
        """Show the DMA-BUF `fd` (dup()ed: close yours when you like). Replaces any previous
        scanout. Raises ScanoutError (a ValueError) for an unknown fourcc, a non-linear
        modifier or a buffer too small for the size and stride."""
        if not (0 < width <= 16384 and 0 < height <= 16384):
            raise ScanoutError(f"scanout size {width}x{height} out of range")
        scanout = Scanout(fd, width, height, stride, fourcc, y0_top, modifier)
        with self.lock:
            old = self.scanout
            self.scanout = scanout
            self.scanout_region = StreamRegion(next(self._scanout_ids) % 64, 0, 0, width, height)
            if (width, height) != (self.width, self.height):
                self._set_size(width, height)
                for view in self.views:
                    view.damage = TileGrid(width, height)
            self.draw_rects.clear()
            self.frame_time = time.monotonic()
        if old is not None:
            old.release()
        self.wake()

    def gl_release(self) -> None:
        """Stop showing the scanout (the producer is gone): its dup closes once unused, pending
        draws complete, and the display shows `frame` again."""
        with self.lock:
            old, self.scanout, self.scanout_region = self.scanout, None, None
            for view in self.views:
                view.damage.add_all()
        if old is not None:
            old.release()
        self.draws.flush()
        self.wake()

    def gl_draw(self, x: int, y: int, width: int, height: int, cookie) -> None:
        """The producer drew into the scanout; `on_gl_draw_done(cookie)` follows exactly once,
        within DRAW_TIMEOUT_S. Returns at once."""
        with self.lock:
            if self.scanout is None:
                raise ScanoutError("gl_draw without a scanout")
            self.frame_time = time.monotonic()
            self.rate.observe(self.frame_time)
        # Outside our lock: with no client the cookie completes right here, in the caller.
        seq = self.draws.draw(cookie)
        with self.lock:
            self.draw_rects.append((seq, x, y, width, height))
        self.wake()

    def drawn_since(self, seq: int) -> tuple[int, int, int, int]:
        """Bounding box of the draws after `seq` (the whole scanout if they are too old)."""
        with self.lock:
            rects = [r[1:] for r in self.draw_rects if r[0] > seq]
            if not self.draw_rects or self.draw_rects[0][0] > seq + 1 or not rects:
                return (0, 0, self.width, self.height)
        x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
        x1, y1 = max(r[0] + r[2] for r in rects), max(r[1] + r[3] for r in rects)
        return (x0, y0, x1 - x0, y1 - y0)

    def tick(self, now: float | None = None) -> None:
        """Periodic check (server timer): ends streams whose region went still, completes
        draws nobody consumed in time."""
        now = time.monotonic() if now is None else now
        self.draws.expire(now)
        with self.lock:
            changed = self.detector.tick(now)
        if changed:
            self.wake()

    def resize(self, width: int, height: int) -> None:
        """Change the surface size; clients get a new surface, black until the next update."""
        with self.lock:
            if (width, height) == (self.width, self.height):
                return
            self._set_size(width, height)
            for view in self.views:  # the old damage is meaningless on the new surface
                view.damage = TileGrid(width, height)
                view.damage.add_all()
        self.wake()

    def update(self, frame, damage: list[Rect] | None = None) -> None:
        """Publish a new frame: (H, W, 4) uint8 BGRx, or any buffer with that layout."""
        with self.lock:
            frame = self._as_frame(frame)
            if damage is None:
                cells = self._find_damage(frame)
            else:
                cells = self._damage_cells(damage)
                self._shadow = None  # given damage: the shadow would be stale
            now = time.monotonic()
            self.rate.observe(now)
            self.frame, self.frame_time = frame, now
            self.frames += 1
            for view in self.views:
                view.damage.add_grid(cells)
            self.detector.damaged(cells, frame, now)
        self.wake()

    def _damage_cells(self, damage: list[Rect]) -> np.ndarray:
        """The tiles `damage` touches (read-only). A video or an animation damages the same
        rectangles frame after frame: their grid is made once."""
        try:
            key = tuple(damage)
            cells = self._grids.get(key)
        except TypeError:  # rectangles given as lists: not a key
            key, cells = None, None
        if cells is None:
            grid = TileGrid(self.width, self.height)
            for x, y, w, h in damage:
                grid.add_rect(int(x), int(y), int(w), int(h))
            cells = grid.cells
            cells.flags.writeable = False
            if key is not None:
                if len(self._grids) >= GRID_CACHE:
                    self._grids.pop(next(iter(self._grids)))  # the oldest pattern
                self._grids[key] = cells
        return cells

    def _as_frame(self, frame) -> np.ndarray:
        shape = (self.height, self.width, 4)
        if isinstance(frame, np.ndarray):
            array = frame
        else:  # any object with the buffer protocol: a view on its memory, no copy
            array = np.frombuffer(frame, np.uint8)
        if array.shape != shape and array.size * array.itemsize == self.width * self.height * 4:
            if array.flags.c_contiguous:
                array = array.reshape(-1).view(np.uint8).reshape(shape)
        if array.dtype != np.uint8 or array.shape != shape:
            raise ValueError(
                f"frame must be {self.height}x{self.width}x4 uint8 (BGRx); got {array.shape} {array.dtype}"
            )
        return array

    def _find_damage(self, frame: np.ndarray) -> np.ndarray:
        # The shadow is our copy of the last frame: the application may draw into one array
        # and pass it again, so its previous contents cannot be read back from it.
        if self._shadow is None:
            self._shadow = frame.copy()
            grid = TileGrid(self.width, self.height)
            grid.add_all()
            return grid.cells
        cells = diff_tiles(frame, self._shadow)
        grid = TileGrid(self.width, self.height)
        grid.add_grid(cells)
        for x, y, w, h in grid.take_rects():
            self._shadow[y : y + h, x : x + w] = frame[y : y + h, x : x + w]
        return cells

    def attach(self) -> ClientView:
        view = ClientView(self)
        with self.lock:
            self.views.append(view)
        return view

    def detach(self, view: ClientView) -> None:
        with self.lock:
            if view in self.views:
                self.views.remove(view)
