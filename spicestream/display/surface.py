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

import threading
import time
from typing import Callable

import numpy as np

from .damage import TileGrid, diff_tiles
from .streams import StreamDetector, StreamRegion

Rect = tuple[int, int, int, int]


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
        self.fps = 30.0  # recent update rate (moving average)
        self.streaming = streaming
        self._set_size(width, height)

    def _set_size(self, width: int, height: int) -> None:
        if not (0 < width <= 16384 and 0 < height <= 16384):
            raise ValueError(f"display size {width}x{height} out of range")
        self.width, self.height = width, height
        self.frame = np.zeros((height, width, 4), np.uint8)
        self._shadow: np.ndarray | None = None
        self.detector = StreamDetector(self.streaming, width, height)

    @property
    def stream_region(self) -> StreamRegion | None:
        return self.detector.region

    def current(self) -> tuple[np.ndarray, int, float]:
        """(frame, generation, publish time), consistently."""
        with self.lock:
            return self.frame, self.frames, self.frame_time

    def tick(self, now: float | None = None) -> None:
        """Periodic check (server timer): ends streams whose region went still."""
        with self.lock:
            changed = self.detector.tick(time.monotonic() if now is None else now)
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
                grid = TileGrid(self.width, self.height)
                for x, y, w, h in damage:
                    grid.add_rect(int(x), int(y), int(w), int(h))
                cells = grid.cells
                self._shadow = None  # given damage: the shadow would be stale
            now = time.monotonic()
            interval = now - self.frame_time
            if 0 < interval < 1:
                self.fps += (1 / interval - self.fps) * 0.1
            self.frame, self.frame_time = frame, now
            self.frames += 1
            for view in self.views:
                view.damage.add_grid(cells)
            self.detector.damaged(cells, frame, now)
        self.wake()

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
