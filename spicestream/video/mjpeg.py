"""The built-in MJPEG encoder: libjpeg-turbo through simplejpeg, no GStreamer needed.

Each frame becomes one complete baseline JFIF (with its own tables), which is exactly what
spice-gtk's built-in decoder and spice-html5 take (brief §6.2). simplejpeg reads strided rows,
so a stream region inside a larger surface is encoded in place, without a copy. Rate control
for MJPEG is by quality (and by the caller dropping frames), not by a bit-rate target.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np

from ..threadname import name_this_thread
from .codec import Codec
from .encoder import EncodedFrame, VideoEncoder

try:
    import simplejpeg
except ImportError:  # reported by available(); the server then has no built-in MJPEG
    simplejpeg = None

QUALITY_STEPS = (20, 30, 40, 50, 60, 70, 80, 90)
# GStreamer byte-order names -> simplejpeg colorspaces
COLORSPACES = {"BGRx": "BGRX", "BGRA": "BGRX", "RGBx": "RGBX", "RGBA": "RGBX",
               "xBGR": "XBGR", "ABGR": "XBGR", "xRGB": "XRGB", "ARGB": "XRGB"}  # spice-server's ladder, plus one
DEFAULT_QUALITY = 80


def available() -> tuple[bool, str]:
    if simplejpeg is None:
        return False, "python package simplejpeg is not installed"
    return True, "libjpeg-turbo via simplejpeg"


# A frame whose JPEG takes less than this is encoded on the thread that hands it over (the
# server's loop): a hand-off to the encoder thread and back costs two thread wake-ups and a
# turn of the loop, ~0.1-0.4 ms of CPU a frame here, while a 640x360 JPEG takes ~0.75 ms.
# A larger one (1280x720: ~3 ms) goes to the thread, where it does not hold up the loop's
# other work (input, audio, other clients' sends).
INLINE_MAX_S = 0.002
INLINE_SAMPLES = 5  # judged on the median of this many recent encodes


def encodes_inline(recent_s) -> bool:
    """Whether the next frame is encoded on the caller's thread, from the durations (s) of
    the last encodes (the encoder keeps INLINE_SAMPLES): only once there are that many and
    their median is small."""
    if len(recent_s) < INLINE_SAMPLES:
        return False
    ordered = sorted(recent_s)
    return ordered[len(ordered) // 2] < INLINE_MAX_S


class MjpegEncoder(VideoEncoder):
    backend = "spice"
    element = "simplejpeg"
    max_in_flight = 1

    def __init__(self, codec: Codec, width: int, height: int, bit_rate: int, on_frame, on_error,
                 quality: int = DEFAULT_QUALITY, pixel_format: str = "BGRx", flip: bool = False):
        if codec != Codec.MJPEG:
            raise ValueError("the built-in encoder only does MJPEG")
        if simplejpeg is None:
            raise RuntimeError(available()[1])
        if pixel_format not in COLORSPACES:
            raise ValueError(f"the built-in encoder cannot read {pixel_format}")
        super().__init__(codec, width, height, bit_rate, on_frame, on_error, pixel_format)
        self.colorspace = COLORSPACES[pixel_format]
        self.flip = flip
        self.quality = quality
        self.recent_s: collections.deque[float] = collections.deque(maxlen=INLINE_SAMPLES)
        self.inline_frames = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started for the first frame it takes

    def _submit(self, frame: np.ndarray, timestamp_ms: int, started: float) -> None:
        if encodes_inline(self.recent_s):
            self.inline_frames += 1
            self._encode_one(frame, timestamp_ms, started)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mjpeg-encoder", daemon=True)
            self._thread.start()
        self._jobs.put((frame, timestamp_ms, started))

    def _run(self) -> None:
        name_this_thread("ss-mjpeg")
        while (job := self._jobs.get()) is not None:
            self._encode_one(*job)

    def _encode_one(self, frame, timestamp_ms: int, started: float) -> None:
        """Encode and hand over one frame (on the encoder thread, or inline); never raises."""
        scanout = frame if hasattr(frame, "drm_fourcc") else None
        try:
            data, copied = self._encode(frame if scanout is None else scanout.pixels(), scanout)
        except Exception as exc:  # reported, never raised to the caller or on the thread
            self._finished(None)
            self._fail(f"simplejpeg: {exc}")
            return
        finally:
            if scanout is not None:
                scanout.release()  # the reference the caller passed in
        self._finished(EncodedFrame(data, timestamp_ms, True, self.width, self.height,
                                    (time.perf_counter() - started) * 1000, copied))

    def _encode(self, frame: np.ndarray, scanout) -> tuple[bytes, int]:
        # A DMA-BUF is mapped and read in place; its bytes count as read into system memory.
        copied = frame.nbytes if scanout is not None else 0
        if self.flip:
            frame = frame[::-1]  # a view: the copy below makes it forward rows
        if frame.strides[1:] != (4, 1) or frame.strides[0] < 0:
            frame = np.ascontiguousarray(frame)  # simplejpeg reads forward, packed pixels
            copied += frame.nbytes
        began = time.perf_counter()
        data = simplejpeg.encode_jpeg(frame, self.quality, colorspace=self.colorspace,
                                      colorsubsampling="420", fastdct=True)
        self.recent_s.append(time.perf_counter() - began)
        return data, copied

    def set_quality(self, quality: int) -> None:
        self.quality = max(1, min(100, int(quality)))

    def force_key_frame(self) -> None:
        pass  # every JPEG is a key frame

    def stats(self) -> dict:
        info = super().stats()
        info["quality"] = self.quality
        info["inline_frames"] = self.inline_frames
        return info

    def close(self) -> None:
        if not self.closed:
            super().close()
            if self._thread is not None:
                self._jobs.put(None)
