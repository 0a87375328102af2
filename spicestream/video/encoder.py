"""The one small interface every video encoder backend implements.

Modelled on spice-server's `video-encoder.h`, made asynchronous: `encode` hands a frame over
and returns at once; the encoded frame arrives later through the `on_frame` callback, on an
encoder thread. At most `max_in_flight` frames are inside an encoder; `encode` refuses more
(returns False) so the caller drops frames *before* encoding rather than queueing them.

    encoder = create_encoder(backend, codec, width, height, bit_rate, on_frame, on_error)
    encoder.encode(frame, timestamp_ms)   # frame: (h, w, 4) uint8 BGRx, rows may be strided
    encoder.set_bit_rate(bps); encoder.force_key_frame(); encoder.stats(); encoder.close()
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .codec import Codec

DEFAULT_BIT_RATE = 8_000_000  # bit/s, spice-server's default starting point
MIN_BIT_RATE = 128_000


@dataclass
class EncodedFrame:
    data: bytes  # one complete frame / access unit, as the client's decoder wants it (§6.2)
    timestamp_ms: int  # the source frame's media time, passed through
    key: bool  # decodable on its own (IDR / key frame / any JPEG)
    width: int
    height: int
    encode_ms: float  # from encode() to the output callback
    copied_bytes: int  # bytes of the input copied in Python on the way in
    # H.264: a skipped picture to send right after this frame, so that the client's parser
    # releases this one at once (video/h264skip.py); None where there is none.
    follow_up: bytes | None = None


@dataclass
class EncoderStats:
    frames_in: int = 0
    frames_out: int = 0
    refused: int = 0  # encode() calls while full: dropped before encoding
    key_frames: int = 0
    bytes_out: int = 0
    copied_bytes: int = 0
    errors: int = 0
    encode_ms: list[float] = field(default_factory=list)  # recent latencies

    def record(self, frame: EncodedFrame) -> None:
        self.frames_out += 1
        self.key_frames += frame.key
        self.bytes_out += len(frame.data)
        self.encode_ms.append(frame.encode_ms)
        del self.encode_ms[:-300]

    def summary(self) -> dict:
        lat = np.array(self.encode_ms) if self.encode_ms else np.zeros(1)
        return {
            "frames_in": self.frames_in, "frames_out": self.frames_out, "refused": self.refused,
            "key_frames": self.key_frames, "bytes_out": self.bytes_out,
            "copied_bytes": self.copied_bytes, "errors": self.errors,
            "encode_ms_p50": float(np.percentile(lat, 50)),
            "encode_ms_p95": float(np.percentile(lat, 95)),
        }


class EncoderError(Exception):
    """An encoder could not be created or failed while encoding."""


FrameCallback = Callable[[EncodedFrame], None]
ErrorCallback = Callable[[str], None]


class VideoEncoder(ABC):
    backend: str = ""
    element: str = ""
    hardware: bool = False
    max_in_flight: int = 2

    def __init__(self, codec: Codec, width: int, height: int, bit_rate: int,
                 on_frame: FrameCallback, on_error: ErrorCallback, pixel_format: str = "BGRx"):
        self.codec, self.width, self.height = codec, width, height
        self.pixel_format = pixel_format  # GStreamer name of the input's byte order
        self.bit_rate = max(MIN_BIT_RATE, int(bit_rate))
        self.on_frame, self.on_error = on_frame, on_error
        self.stats_ = EncoderStats()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.closed = False

    def encode(self, frame, timestamp_ms: int) -> bool:
        """Start encoding `frame`; False (frame dropped) when the encoder is full or closed.

        `frame` is an (h, w, 4) uint8 array in `pixel_format` byte order (rows may be strided),
        or a `display.scanout.Scanout` (a DMA-BUF the encoder imports or maps)."""
        shape = (frame.height, frame.width) if hasattr(frame, "drm_fourcc") else frame.shape[:2]
        if shape != (self.height, self.width):
            raise ValueError(f"frame {shape} does not match encoder {self.height}x{self.width}")
        with self._lock:
            if self.closed or self._in_flight >= self.max_in_flight:
                self.stats_.refused += 1
                if hasattr(frame, "drm_fourcc"):
                    frame.release()  # a scanout reference is ours to give back, used or not
                return False
            self._in_flight += 1
            self.stats_.frames_in += 1
        try:
            self._submit(frame, timestamp_ms, time.perf_counter())
        except Exception as exc:
            self._finished(None)
            self._fail(f"{self.element}: {exc}")
            return False
        return True

    def _finished(self, frame: EncodedFrame | None) -> None:
        """Backends call this once per submitted frame, from any thread."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if frame is not None:
                self.stats_.record(frame)
                self.stats_.copied_bytes += frame.copied_bytes
        if frame is not None and not self.closed:
            self.on_frame(frame)

    def _fail(self, message: str) -> None:
        self.stats_.errors += 1
        if not self.closed:
            self.on_error(message)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def output_totals(self) -> tuple[int, int]:
        """(frames, bytes) encoded so far: for decisions made every tick, which need not pay
        for the percentiles of `stats()`."""
        return self.stats_.frames_out, self.stats_.bytes_out

    def stats(self) -> dict:
        info = self.stats_.summary()
        info.update(codec=self.codec.label, element=self.element, hardware=self.hardware,
                    bit_rate=self.bit_rate, width=self.width, height=self.height)
        return info

    @abstractmethod
    def _submit(self, frame, timestamp_ms: int, started: float) -> None: ...

    def set_bit_rate(self, bit_rate: int) -> None:
        self.bit_rate = max(MIN_BIT_RATE, int(bit_rate))

    @abstractmethod
    def force_key_frame(self) -> None: ...

    def close(self) -> None:
        self.closed = True


def encode_sync(encoder: VideoEncoder, frame: np.ndarray, timestamp_ms: int,
                timeout: float = 5.0) -> EncodedFrame:
    """Encode one frame and wait for it (tests and benchmarks; servers use callbacks)."""
    done = threading.Event()
    result: list = []
    previous = encoder.on_frame, encoder.on_error
    encoder.on_frame = lambda f: (result.append(f), done.set())
    encoder.on_error = lambda m: (result.append(EncoderError(m)), done.set())
    try:
        if not encoder.encode(frame, timestamp_ms):
            raise EncoderError("encoder busy or closed")
        if not done.wait(timeout):
            raise EncoderError("timed out waiting for the encoded frame")
    finally:
        encoder.on_frame, encoder.on_error = previous
    if isinstance(result[0], EncoderError):
        raise result[0]
    return result[0]
