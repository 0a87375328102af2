"""Zero-copy hand-off of numpy frames to a GStreamer ``appsrc``.

PyGObject cannot wrap foreign memory cheaply: ``Gst.Buffer.new_wrapped`` on an
ndarray marshals element by element (~200 ms per 1080p frame), on ``bytes`` it
copies, and ``new_wrapped_full`` does not keep the Python object alive.  So the
buffer is built and pushed entirely through ctypes on the C API:

* ``gst_buffer_new_wrapped_full`` points a read-only GstMemory at the array's
  own pixels; the array sits in ``_live`` until GStreamer's destroy notify says
  the memory is gone.
* ``gst_buffer_add_video_meta_full`` records the row stride, so a sub-region of
  a bigger surface (rows ``W*4`` apart) is read in place by any element that
  maps frames with ``gst_video_frame_map`` (videoconvert, encoders).
* ``gst_app_src_push_buffer`` takes ownership; no Python Gst.Buffer exists.
* ``ReusedBuffers`` keeps buffers of one layout (I420 frames converted for an
  encoder) wrapped once, and pushes each again when GStreamer has let go of it.

Caller contract: pixels are read *later*, on a streaming thread.  Writing into
the pushed region before its release (``on_release`` / ``WrapStats.live``)
shows up in the encoded frame.  Set pipelines to NULL before the interpreter
exits, so no notify can arrive during finalisation.
"""
from __future__ import annotations

import ctypes
import itertools
import threading
from typing import Callable

import numpy as np

from ..gstreamer import load

Gst, GstApp, GstVideo = load("Gst", "GstApp", "GstVideo")

__all__ = ["push_frame", "ReusedBuffers", "WrapStats", "PushError", "gobject_pointer"]

_gst = ctypes.CDLL("libgstreamer-1.0.so.0")
_gstvideo = ctypes.CDLL("libgstvideo-1.0.so.0")
_gstapp = ctypes.CDLL("libgstapp-1.0.so.0")

_NOTIFY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # GDestroyNotify

_gst.gst_buffer_new_wrapped_full.restype = ctypes.c_void_p
_gst.gst_buffer_new_wrapped_full.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
    ctypes.c_size_t, ctypes.c_void_p, _NOTIFY]
_gst.gst_buffer_new.restype = ctypes.c_void_p
_gst.gst_buffer_new.argtypes = []
_gst.gst_buffer_get_type.restype = ctypes.c_size_t
_gst.gst_buffer_get_type.argtypes = []
_gst.gst_mini_object_unref.restype = None
_gst.gst_mini_object_unref.argtypes = [ctypes.c_void_p]
_gst.gst_mini_object_ref.restype = ctypes.c_void_p
_gst.gst_mini_object_ref.argtypes = [ctypes.c_void_p]
_gst.gst_buffer_peek_memory.restype = ctypes.c_void_p
_gst.gst_buffer_peek_memory.argtypes = [ctypes.c_void_p, ctypes.c_uint]

_MAX_PLANES = GstVideo.VIDEO_MAX_PLANES
_gstvideo.gst_buffer_add_video_meta_full.restype = ctypes.c_void_p
_gstvideo.gst_buffer_add_video_meta_full.argtypes = [
    ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
    ctypes.c_uint, ctypes.c_size_t * _MAX_PLANES, ctypes.c_int * _MAX_PLANES]

_gstapp.gst_app_src_push_buffer.restype = ctypes.c_int
_gstapp.gst_app_src_push_buffer.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

_MEMORY_READONLY = int(Gst.MemoryFlags.READONLY)
_FRAME_FLAG_NONE = int(GstVideo.VideoFrameFlags.NONE)
_FORMAT_BGRX = int(GstVideo.VideoFormat.BGRX)
_FLOW_OK = int(Gst.FlowReturn.OK)
_CLOCK_TIME_NONE = 2**64 - 1


# GST_BUFFER_PTS/DURATION are macros over public struct fields, with no
# setter function in C; mirror the struct so ctypes computes the ABI offsets.
class _GstMiniObject(ctypes.Structure):
    _fields_ = [("type", ctypes.c_size_t), ("refcount", ctypes.c_int),
                ("lockstate", ctypes.c_int), ("flags", ctypes.c_uint),
                ("copy", ctypes.c_void_p), ("dispose", ctypes.c_void_p),
                ("free", ctypes.c_void_p), ("priv_uint", ctypes.c_uint),
                ("priv_pointer", ctypes.c_void_p)]


class _GstBuffer(ctypes.Structure):
    _fields_ = [("mini_object", _GstMiniObject), ("pool", ctypes.c_void_p),
                ("pts", ctypes.c_uint64), ("dts", ctypes.c_uint64),
                ("duration", ctypes.c_uint64), ("offset", ctypes.c_uint64),
                ("offset_end", ctypes.c_uint64)]


def _layout_matches() -> bool:
    # A fresh buffer has known contents in every field we mirror: if they all
    # read back right, the offsets are right on this build.
    ptr = _gst.gst_buffer_new()
    try:
        b = _GstBuffer.from_address(ptr)
        return (b.mini_object.type == _gst.gst_buffer_get_type()
                and b.mini_object.refcount == 1 and not b.pool
                and b.pts == b.dts == b.duration == _CLOCK_TIME_NONE
                and b.offset == b.offset_end == _CLOCK_TIME_NONE)
    finally:
        _gst.gst_mini_object_unref(ptr)


_TIMESTAMPS_OK = _layout_matches()
# GstMemory starts with a GstMiniObject too: its refcount lies where a buffer's does.
_REFCOUNT_OFFSET = _GstMiniObject.refcount.offset


class WrapStats:
    """Process-wide counters; ``live`` = wrapped buffers not yet freed (pushed ones GStreamer
    still holds, and ``ReusedBuffers``' own until closed)."""

    _lock = threading.Lock()
    wraps = 0
    releases = 0
    live = 0

    @classmethod
    def snapshot(cls) -> tuple[int, int, int]:
        with cls._lock:
            return cls.wraps, cls.releases, cls.live


class PushError(RuntimeError):
    """appsrc refused the buffer (flushing, EOS, not linked...)."""

    def __init__(self, flow: Gst.FlowReturn):
        super().__init__(f"appsrc push failed: {flow.value_nick}")
        self.flow = flow


# key -> (array, on_release). The key travels as the notify's user_data:
# an int survives the C round trip, a Python pointer would need refcount games.
_live: dict[int, tuple[np.ndarray, Callable[[], None] | None]] = {}
_keys = itertools.count(1)  # never 0: user_data NULL would read back as None


def _on_destroy(key):
    # Runs on whichever GStreamer thread drops the last ref; an exception here
    # could only be printed, so swallow everything.
    try:
        _, on_release = _live.pop(key, (None, None))
        with WrapStats._lock:
            WrapStats.releases += 1
            WrapStats.live -= 1
        if on_release is not None:
            on_release()
    except BaseException:  # noqa: BLE001
        pass


_on_destroy_c = _NOTIFY(_on_destroy)  # module-lifetime: C keeps calling it


def gobject_pointer(obj) -> int:
    """C address of a PyGObject GObject wrapper (``__gpointer__`` capsule)."""
    return _capsule_pointer(obj.__gpointer__, None)


def push_frame(appsrc: Gst.Element, frame: np.ndarray,
               pts_ns: int | None = None, duration_ns: int | None = None,
               on_release: Callable[[], None] | None = None) -> int:
    """Push a BGRx ``(h, w, 4) uint8`` frame into ``appsrc`` without copying.

    Rows may be any ``row_stride >= w*4`` apart (a view into a larger
    surface); a GstVideoMeta carries the stride.  ``frame`` is kept alive
    until GStreamer frees the memory, then ``on_release`` (if given) is called
    on a GStreamer thread.  Returns bytes copied in Python: 0, or
    ``frame.nbytes`` when the layout cannot be wrapped (negative or
    overlapping strides, non-contiguous pixels) and a compact copy is pushed
    instead.  Raises ``PushError`` if appsrc rejects the buffer (it is freed).
    Without ``pts_ns`` the buffer is untimestamped: set ``do-timestamp=true``
    on appsrc, or give times here.
    """
    if not isinstance(appsrc, GstApp.AppSrc):
        raise TypeError(f"expected an appsrc, got {type(appsrc).__name__}")
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 \
            or frame.ndim != 3 or frame.shape[2] != 4:
        raise ValueError("frame must be an (h, w, 4) uint8 ndarray")
    h, w = frame.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("empty frame")
    if (pts_ns is not None or duration_ns is not None) and not _TIMESTAMPS_OK:
        raise RuntimeError("GstBuffer layout not recognised; use do-timestamp")

    copied = 0
    row_stride = frame.strides[0] if h > 1 else w * 4
    pixel_stride = frame.strides[1] if w > 1 else 4  # numpy: any for size 1
    if (pixel_stride, frame.strides[2]) != (4, 1) or row_stride < w * 4:
        frame = np.ascontiguousarray(frame)
        copied = frame.nbytes
        row_stride = w * 4
    span = (h - 1) * row_stride + w * 4
    buf = _wrap(frame, span, _FORMAT_BGRX, w, h, (0,), (row_stride,), on_release)
    if pts_ns is not None or duration_ns is not None:
        fields = _GstBuffer.from_address(buf)
        if pts_ns is not None:
            fields.pts = pts_ns
        if duration_ns is not None:
            fields.duration = duration_ns

    # ctypes drops the GIL here, so a blocking appsrc (block=true) stalls only
    # this thread, and the notify can run on the streaming thread meanwhile.
    flow = _gstapp.gst_app_src_push_buffer(gobject_pointer(appsrc), buf)
    if flow != _FLOW_OK:
        raise PushError(Gst.FlowReturn(flow))
    return copied


class ReusedBuffers:
    """GstBuffers over numpy arrays of one planar layout, wrapped once and pushed again as
    soon as GStreamer has let go of them. Per frame this costs three C calls (ref, push, and
    the caller's own fill), where wrapping a fresh buffer costs a wrap, a video meta, a
    destroy notify back into Python on the streaming thread, and bookkeeping: each a few
    microseconds in a loop, ~10x that on a frame's cold path.

    A buffer is free when we hold its only reference and its memory is not shared with a copy
    (an element that had to change a buffer it shared made a shallow copy: the copy refers to
    the same memory). Use from one thread; `close()` once the pipeline is NULL."""

    class Slot:
        __slots__ = ("array", "address", "buffer", "_refs", "_memory_refs", "_fields")

    def __init__(self, appsrc: Gst.Element, nbytes: int, video_format: int, width: int,
                 height: int, offsets: tuple[int, ...], strides: tuple[int, ...], limit: int = 8):
        if not isinstance(appsrc, GstApp.AppSrc):
            raise TypeError(f"expected an appsrc, got {type(appsrc).__name__}")
        if not 0 < len(offsets) == len(strides) <= _MAX_PLANES:
            raise ValueError("one offset and one stride per plane")
        if not _TIMESTAMPS_OK:
            raise RuntimeError("GstBuffer layout not recognised")
        self._appsrc, self._appsrc_pointer = appsrc, gobject_pointer(appsrc)
        self._layout = (nbytes, video_format, width, height, tuple(offsets), tuple(strides))
        self.limit = limit
        self.slots: list[ReusedBuffers.Slot] = []
        self.closed = False

    def take(self) -> "ReusedBuffers.Slot | None":
        """A buffer nobody else holds, to fill through `slot.address`; None if `limit`
        buffers are all in GStreamer's hands, or once closed."""
        if self.closed:
            return None
        for slot in self.slots:
            # GStreamer drops references with atomic decrements (full barriers on x86), so
            # once both read 1, whoever read the frame has finished with it.
            if slot._refs.value == 1 and slot._memory_refs.value == 1:
                return slot
        if len(self.slots) >= self.limit:
            return None
        nbytes, video_format, width, height, offsets, strides = self._layout
        array = np.empty(nbytes, np.uint8)
        slot = ReusedBuffers.Slot()
        slot.array, slot.address = array, array.__array_interface__["data"][0]
        slot.buffer = _wrap(array, nbytes, video_format, width, height, offsets, strides, None)
        memory = _gst.gst_buffer_peek_memory(slot.buffer, 0)
        slot._refs = ctypes.c_int.from_address(slot.buffer + _REFCOUNT_OFFSET)
        slot._memory_refs = ctypes.c_int.from_address(memory + _REFCOUNT_OFFSET)
        slot._fields = _GstBuffer.from_address(slot.buffer)
        self.slots.append(slot)
        return slot

    def push(self, slot: "ReusedBuffers.Slot", pts_ns: int, duration_ns: int) -> None:
        if self.closed:
            raise RuntimeError("ReusedBuffers closed")
        slot._fields.pts, slot._fields.duration = pts_ns, duration_ns
        _gst.gst_mini_object_ref(slot.buffer)  # appsrc takes this reference; ours stays
        flow = _gstapp.gst_app_src_push_buffer(self._appsrc_pointer, slot.buffer)
        if flow != _FLOW_OK:
            raise PushError(Gst.FlowReturn(flow))

    def close(self) -> None:
        self.closed = True
        slots, self.slots = self.slots, []
        for slot in slots:
            _gst.gst_mini_object_unref(slot.buffer)  # the array goes with the last reference


def _wrap(array: np.ndarray, span: int, video_format: int, w: int, h: int, plane_offsets,
          plane_strides, on_release) -> int:
    """A new GstBuffer (we hold its one reference) over `array`'s first `span` bytes, with a
    video meta; `array` lives until the buffer is freed, then `on_release` is called."""
    data = array.__array_interface__["data"][0]
    key = next(_keys)
    # Registered before the buffer exists: the notify can fire at any point
    # from here on (even inside push_buffer, if appsrc is flushing).
    _live[key] = (array, on_release)
    with WrapStats._lock:
        WrapStats.wraps += 1
        WrapStats.live += 1
    buf = _gst.gst_buffer_new_wrapped_full(
        _MEMORY_READONLY, data, span, 0, span, key, _on_destroy_c)
    if not buf:  # notify is not called on failure
        _on_destroy(key)
        raise MemoryError("gst_buffer_new_wrapped_full failed")

    offsets = (ctypes.c_size_t * _MAX_PLANES)(*plane_offsets)
    strides = (ctypes.c_int * _MAX_PLANES)(*plane_strides)
    if not _gstvideo.gst_buffer_add_video_meta_full(
            buf, _FRAME_FLAG_NONE, video_format, w, h, len(plane_offsets), offsets, strides):
        _gst.gst_mini_object_unref(buf)
        raise RuntimeError("gst_buffer_add_video_meta_full failed")
    return buf
