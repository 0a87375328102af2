"""RGB frames to I420 with libyuv, on the thread that hands the frame to the encoder.

The software encoders (x264, libvpx, openh264) take I420. GStreamer 1.22's videoconvert has
no fast path from RGB to YUV: it converts through a per-pixel lookup-table loop in plain C,
~0.4 ms per 640x360 frame in a tight loop and 6-9 ms at 1080p, as much as x264 itself.
libyuv's SIMD ARGBToI420 does 640x360 in ~35 us (`bench/encode_cpu.py` compares the two in
the encoder's path).

libyuv names formats after a little-endian 32-bit word: its "ARGB" lies B,G,R,A in memory
(GStreamer's BGRx/BGRA), its "ABGR" lies R,G,B,A (RGBx/RGBA). It converts with BT.601 in
limited range, and the caps say `colorimetry=bt601`. A decoder converts back with what the
stream says, or else with GStreamer's default for the size: BT.601 up to 576 lines, BT.709
above (what spice-gtk's vp8dec and videoconvert do). So libyuv serves an encoder at any
size only if the encoder writes the colorimetry into the stream (x264, x265: the SPS's VUI),
and the others (libvpx, openh264: measured in tests/test_yuv.py) up to 576 lines; above that
they keep videoconvert, which converts with BT.709 there.

The I420 frames are written into buffers GStreamer hands back (gstbuffer.ReusedBuffers): no
allocation, and so no fresh pages to fault in, per frame.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np

LIBRARY = "libyuv.so.0"  # Debian: libyuv0
# GStreamer format -> libyuv function (see above for the names)
_FUNCTIONS = {"BGRx": "ARGBToI420", "BGRA": "ARGBToI420", "RGBx": "ABGRToI420", "RGBA": "ABGRToI420"}
CAPS = "video/x-raw,format=I420,colorimetry=bt601"


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("SPICESTREAM_LIBYUV", "1") == "0":  # A/B runs in bench/
        return None, "turned off (SPICESTREAM_LIBYUV=0)"
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("yuv") or LIBRARY)
    except OSError as exc:
        return None, f"libyuv not found ({exc}; Debian: libyuv0)"
    p, i = ctypes.c_void_p, ctypes.c_int
    try:
        for name in set(_FUNCTIONS.values()):
            fn = getattr(lib, name)
            fn.restype = i
            fn.argtypes = [p, i, p, i, p, i, p, i, i, i]
    except AttributeError as exc:
        return None, f"this libyuv lacks a function: {exc}"
    return lib, ""


_lib, UNAVAILABLE = _load()


def converts(pixel_format: str) -> bool:
    """Whether frames in `pixel_format` (a GStreamer byte-order name) are converted here."""
    return _lib is not None and pixel_format in _FUNCTIONS


def bt601_by_default(height: int) -> bool:
    """Whether GStreamer assumes BT.601 for YUV frames of this height (video-info.c)."""
    return height <= 576


def i420_layout(width: int, height: int) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """GStreamer's default I420 layout: plane offsets, row strides (4-byte aligned), size."""
    y_stride = (width + 3) & ~3
    c_width, c_height = (width + 1) // 2, (height + 1) // 2
    c_stride = (c_width + 3) & ~3
    u = y_stride * ((height + 1) & ~1)
    v = u + c_stride * c_height
    return (0, u, v), (y_stride, c_stride, c_stride), v + c_stride * c_height


class I420Converter:
    """Converts (h, w, 4) frames of one size and byte order to I420 in GStreamer's layout."""

    def __init__(self, width: int, height: int, pixel_format: str, flip: bool = False):
        if not converts(pixel_format):
            raise ValueError(f"libyuv cannot convert {pixel_format}: {UNAVAILABLE or 'unknown order'}")
        self.width, self.height, self.flip = width, height, flip
        self.offsets, self.strides, self.size = i420_layout(width, height)
        self._fn = getattr(_lib, _FUNCTIONS[pixel_format])

    def convert(self, frame: np.ndarray, address: int) -> int:
        """Write `frame` (rows may be strided) as I420 at `address` (`size` bytes); returns
        the bytes copied in Python to make the rows readable (0 unless the layout is unusual)."""
        h, w = frame.shape[:2]
        if (h, w) != (self.height, self.width) or frame.dtype != np.uint8 or frame.shape[2] != 4:
            raise ValueError(f"frame {frame.shape} is not ({self.height}, {self.width}, 4) uint8")
        copied = 0
        if frame.strides[1:] != (4, 1) or frame.strides[0] < w * 4:
            frame = np.ascontiguousarray(frame)
            copied = frame.nbytes
        (y, u, v), (ys, cs, _) = self.offsets, self.strides
        # A negative height makes libyuv read the rows bottom-up: the frame turned upside down.
        rc = self._fn(frame.__array_interface__["data"][0], frame.strides[0], address + y, ys,
                      address + u, cs, address + v, cs, w, -h if self.flip else h)
        if rc != 0:
            raise ValueError(f"libyuv refused a {w}x{h} frame ({rc})")
        return copied
