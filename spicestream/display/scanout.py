"""A GPU scanout handed over as a DMA-BUF fd, and the draws made on it.

Ownership of fds, in one place:
  - `gl_scanout` dup()s the producer's fd into a `Scanout`; the producer keeps its own.
  - A `Scanout` is reference counted: the display holds one reference, every user (an
    encode in flight, a local client being sent the fd) takes one with `acquire()` and gives
    it back with `release()`. The dup is closed when the count reaches zero, so replacing the
    scanout never pulls the fd from under a user.
  - Encoders that import the buffer (GStreamer's DmaBufAllocator) get their own dup, which the
    allocated memory owns and closes when GStreamer frees it.

Draw completion: `DrawTracker` gives each `gl_draw` a sequence number and completes its cookie
exactly once - when every client that needs the draw has consumed a frame at least that new,
when no client needs it, or after DRAW_TIMEOUT_S, whichever comes first.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..stats import LatencyHistogram

DRAW_TIMEOUT_S = 0.85  # under the promised 1 s; the server's tick runs at the next deadline
DRM_FORMAT_MOD_LINEAR = 0
DRM_FORMAT_MOD_INVALID = (1 << 56) - 1  # "implicit": drivers treat a plain buffer as linear


def fourcc(code: str) -> int:
    a, b, c, d = (ord(ch) for ch in code)
    return a | b << 8 | c << 16 | d << 24


# DRM fourcc -> (GStreamer format, bytes per pixel). DRM names little-endian words, GStreamer
# names bytes in memory order: XRGB8888 is B, G, R, X in memory, i.e. "BGRx".
FORMATS = {
    fourcc("XR24"): ("BGRx", 4),  # XRGB8888
    fourcc("AR24"): ("BGRA", 4),  # ARGB8888
    fourcc("XB24"): ("RGBx", 4),  # XBGR8888
    fourcc("AB24"): ("RGBA", 4),  # ABGR8888
    fourcc("RX24"): ("xBGR", 4),  # RGBX8888
    fourcc("RA24"): ("ABGR", 4),  # RGBA8888
    fourcc("BX24"): ("xRGB", 4),  # BGRX8888
    fourcc("BA24"): ("ARGB", 4),  # BGRA8888
    fourcc("NV12"): ("NV12", 1),
}
DRM_NAMES = {v: k for k, v in {
    "XRGB8888": fourcc("XR24"), "ARGB8888": fourcc("AR24"), "XBGR8888": fourcc("XB24"),
    "ABGR8888": fourcc("AB24"), "RGBX8888": fourcc("RX24"), "RGBA8888": fourcc("RA24"),
    "BGRX8888": fourcc("BX24"), "BGRA8888": fourcc("BA24"), "NV12": fourcc("NV12")}.items()}


class ScanoutError(ValueError):
    """A scanout that cannot be used (format, modifier, size, fd)."""


class Scanout:
    def __init__(self, fd: int, width: int, height: int, stride: int, drm_fourcc: int,
                 y0_top: bool = True, modifier: int = 0):
        if drm_fourcc not in FORMATS:
            raise ScanoutError(f"unsupported DRM fourcc 0x{drm_fourcc:08x}")
        if modifier not in (DRM_FORMAT_MOD_LINEAR, DRM_FORMAT_MOD_INVALID):
            raise ScanoutError(f"modifier 0x{modifier:x} is not linear: the encoders here read "
                               "linear buffers only")
        self.gst_format, bpp = FORMATS[drm_fourcc]
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ScanoutError(f"scanout size {width}x{height} must be positive and even")
        if stride < width * bpp:
            raise ScanoutError(f"stride {stride} is less than {width} pixels")
        self.width, self.height, self.stride = width, height, stride
        self.drm_fourcc, self.y0_top, self.modifier = drm_fourcc, y0_top, modifier
        planes = 1.5 if self.gst_format == "NV12" else 1
        self.size = int(stride * height * planes)
        try:
            self.fd = os.dup(fd)
        except OSError as exc:
            raise ScanoutError(f"cannot dup fd {fd}: {exc}") from None
        try:
            end = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            end = None  # not seekable: trust the caller
        if end is not None and 0 < end < self.size:
            os.close(self.fd)
            raise ScanoutError(f"buffer holds {end} bytes, {self.size} needed")
        self._refs = 1
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None

    def acquire(self) -> "Scanout | None":
        """Take a reference; None if the scanout is already closed."""
        with self._lock:
            if self._refs == 0:
                return None
            self._refs += 1
            return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs > 0:
                return
            fd, self.fd = self.fd, -1
            mapping, self._map = self._map, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # a numpy view still refers to it: the GC unmaps later
                pass
        os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def dup(self) -> int:
        """A new fd for a consumer that will own (and close) it."""
        return os.dup(self.fd)

    def pixels(self) -> np.ndarray:
        """(h, w, 4) view of the mapped buffer, rows as the producer stored them (bottom row
        first when y0_top is False: streams say so in their flags and clients flip). For
        system-memory consumers; maps once, no copy."""
        if self.gst_format == "NV12":
            raise ScanoutError("NV12 scanouts have no packed pixel view")
        with self._lock:
            if self._map is None:
                self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            rows = np.frombuffer(self._map, np.uint8, self.stride * self.height).reshape(self.height, self.stride)
        return rows[:, : self.width * 4].reshape(self.height, self.width, 4)


@dataclass
class PendingDraw:
    seq: int
    cookie: object
    deadline: float
    waiting: set = field(default_factory=set)  # consumers that still need it


class DrawTracker:
    """Completes each gl_draw cookie exactly once (thread-safe)."""

    def __init__(self, on_done: Callable[[object], None]):
        self.on_done = on_done
        self._lock = threading.Lock()
        self._pending: dict[int, PendingDraw] = {}
        self._consumers: set = set()
        self.seq = 0
        self.completed = 0
        self.late = 0  # completed by the timeout rather than by consumers
        self.latency = LatencyHistogram()  # gl_draw -> completion

    def add_consumer(self, consumer) -> None:
        with self._lock:
            self._consumers.add(consumer)

    def remove_consumer(self, consumer) -> None:
        """A consumer left (disconnect, failure): it no longer holds anything up."""
        with self._lock:
            self._consumers.discard(consumer)
            done = self._collect(lambda d: d.waiting.discard(consumer))
        self._finish(done)

    def draw(self, cookie) -> int:
        with self._lock:
            self.seq += 1
            draw = PendingDraw(self.seq, cookie, time.monotonic() + DRAW_TIMEOUT_S, set(self._consumers))
            self._pending[draw.seq] = draw
            done = self._collect(lambda d: None)
        self._finish(done)
        return draw.seq

    def consumed(self, consumer, seq: int) -> None:
        """`consumer` has what it needs from every draw up to `seq`."""
        with self._lock:
            done = self._collect(lambda d: d.waiting.discard(consumer) if d.seq <= seq else None)
        self._finish(done)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [d for d in self._pending.values() if d.deadline <= now]
            for d in late:
                del self._pending[d.seq]
            self.late += len(late)
        self._finish(late)

    def flush(self) -> None:
        """Complete everything (scanout replaced, server stopping)."""
        with self._lock:
            done, self._pending = list(self._pending.values()), {}
        self._finish(done)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((d.deadline for d in self._pending.values()), default=None)

    def _collect(self, update) -> list[PendingDraw]:
        done = []
        for seq in sorted(self._pending):
            d = self._pending[seq]
            update(d)
            if not d.waiting:
                done.append(self._pending.pop(seq))
        return done

    def _finish(self, done: list[PendingDraw]) -> None:
        # Callbacks run outside the lock, in draw order; each draw left _pending exactly once.
        now = time.monotonic()
        for d in done:
            self.completed += 1
            self.latency.observe(now - (d.deadline - DRAW_TIMEOUT_S))
            try:
                self.on_done(d.cookie)
            except Exception:  # the producer's bug must not stop other completions
                import logging

                logging.getLogger("spicestream.scanout").exception("on_gl_draw_done failed")
