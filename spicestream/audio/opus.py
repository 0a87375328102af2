"""Opus encoding and decoding through libopus itself (ctypes): one 10 ms frame in, one packet
out, on the caller's thread, with no pipeline between (bench/audio.py measured it against
GStreamer's opusenc behind appsrc/appsink)."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

OPUS_APPLICATION_AUDIO = 2049
OPUS_APPLICATION_RESTRICTED_LOWDELAY = 2051
OPUS_SET_BITRATE_REQUEST = 4002
OPUS_OK = 0
MAX_PACKET = 4000  # bytes; libopus' own recommendation for one packet


class OpusError(RuntimeError):
    pass


def _load():
    name = ctypes.util.find_library("opus") or "libopus.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise OpusError(f"libopus is not installed ({exc}); Debian: libopus0") from None
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_encode.restype = ctypes.c_int32
    lib.opus_encode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int32]
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encoder_ctl.restype = ctypes.c_int
    lib.opus_encoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int32]
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    return lib


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


class OpusEncoder:
    def __init__(self, rate: int = 48000, channels: int = 2, bit_rate: int = 96000,
                 application: int = OPUS_APPLICATION_RESTRICTED_LOWDELAY):
        self.lib, self.rate, self.channels = lib(), rate, channels
        error = ctypes.c_int()
        self._state = self.lib.opus_encoder_create(rate, channels, application, ctypes.byref(error))
        if error.value != OPUS_OK or not self._state:
            raise OpusError(f"opus_encoder_create failed ({error.value})")
        self.lib.opus_encoder_ctl(self._state, OPUS_SET_BITRATE_REQUEST, bit_rate)
        self._out = ctypes.create_string_buffer(MAX_PACKET)

    def encode(self, pcm: np.ndarray) -> bytes:
        """One frame of interleaved int16 (samples x channels; 2.5-60 ms) -> one packet."""
        pcm = np.ascontiguousarray(pcm, np.int16)
        frames = pcm.size // self.channels
        n = self.lib.opus_encode(self._state, pcm.ctypes.data, frames, self._out, MAX_PACKET)
        if n < 0:
            raise OpusError(f"opus_encode failed ({n})")
        return self._out.raw[:n]

    def close(self) -> None:
        if self._state:
            self.lib.opus_encoder_destroy(self._state)
            self._state = None

    __del__ = close


class OpusDecoder:
    def __init__(self, rate: int = 48000, channels: int = 2):
        self.lib, self.rate, self.channels = lib(), rate, channels
        error = ctypes.c_int()
        self._state = self.lib.opus_decoder_create(rate, channels, ctypes.byref(error))
        if error.value != OPUS_OK or not self._state:
            raise OpusError(f"opus_decoder_create failed ({error.value})")
        self._pcm = np.zeros(5760 * channels, np.int16)  # 120 ms, the longest packet

    def decode(self, packet: bytes) -> np.ndarray:
        """One packet -> interleaved int16 (samples x channels). Raises OpusError if bad."""
        n = self.lib.opus_decode(self._state, packet, len(packet), self._pcm.ctypes.data, 5760, 0)
        if n < 0:
            raise OpusError(f"opus_decode failed ({n})")
        return self._pcm[: n * self.channels].reshape(n, self.channels).copy()

    def close(self) -> None:
        if self._state:
            self.lib.opus_decoder_destroy(self._state)
            self._state = None

    __del__ = close
