"""Low-latency recording of a PulseAudio source through libpulse-simple (ctypes), for
measuring when sound is heard: `parec` delivers the monitor in large fragments whatever
--latency-msec says (a fixed ~330 ms here), this reads 5 ms fragments."""

from __future__ import annotations

import ctypes
import ctypes.util

PA_SAMPLE_S16LE = 3
PA_STREAM_RECORD = 2


class SampleSpec(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8)]


class BufferAttr(ctypes.Structure):
    _fields_ = [("maxlength", ctypes.c_uint32), ("tlength", ctypes.c_uint32), ("prebuf", ctypes.c_uint32),
                ("minreq", ctypes.c_uint32), ("fragsize", ctypes.c_uint32)]


class PulseRecorder:
    def __init__(self, server: str, source: str, rate: int = 48000, channels: int = 2, fragment_ms: int = 5):
        self.lib = ctypes.CDLL(ctypes.util.find_library("pulse-simple") or "libpulse-simple.so.0")
        self.lib.pa_simple_new.restype = ctypes.c_void_p
        self.lib.pa_simple_new.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                           ctypes.c_char_p, ctypes.POINTER(SampleSpec), ctypes.c_void_p,
                                           ctypes.POINTER(BufferAttr), ctypes.POINTER(ctypes.c_int)]
        self.lib.pa_simple_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
        self.lib.pa_simple_free.argtypes = [ctypes.c_void_p]
        spec = SampleSpec(PA_SAMPLE_S16LE, rate, channels)
        frag = rate * channels * 2 * fragment_ms // 1000
        attr = BufferAttr(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, frag)
        error = ctypes.c_int()
        self.handle = self.lib.pa_simple_new(server.encode(), b"spicestream-test", PA_STREAM_RECORD, source.encode(),
                                             b"record", ctypes.byref(spec), None, ctypes.byref(attr), ctypes.byref(error))
        if not self.handle:
            raise RuntimeError(f"pa_simple_new failed ({error.value})")
        self.frag = frag

    def read(self, nbytes: int) -> bytes:
        buf = ctypes.create_string_buffer(nbytes)
        error = ctypes.c_int()
        if self.lib.pa_simple_read(self.handle, buf, nbytes, ctypes.byref(error)) < 0:
            raise RuntimeError(f"pa_simple_read failed ({error.value})")
        return buf.raw

    def close(self) -> None:
        if self.handle:
            self.lib.pa_simple_free(self.handle)
            self.handle = None
