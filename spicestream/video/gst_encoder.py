"""The GStreamer backend: `appsrc [! videoconvert [! queue]] ! <encoder> ! <caps> ! appsink`.

Frames in memory for a software encoder that takes I420 (x264, libvpx, openh264) are converted
by libyuv as they are handed over, into reused buffers (yuv.py: ~10x less CPU than
videoconvert), and go straight to the encoder; libyuv's BT.601 is used only where the
decoder converts back with it (yuv.py says when). Everything else (DMA-BUF scanouts,
hardware encoders, VP8 above 576 lines, MJPEG, a machine without libyuv) goes through
videoconvert, without a copy on the way in (gstbuffer.push_frame wraps the application's
memory, strided regions included). There, large frames are converted on several threads and
encoded behind a queue, so at 2 frames in flight a 2-core machine converts one frame while
it encodes the previous one; small frames (at most SMALL_FRAME_PIXELS) are converted and
encoded on one thread, where the hand-offs cost more than the overlap saves. Output buffers
come back in input order on the appsink's streaming thread and are matched to their input by
order (encoders shift PTS, see gstreamer-python.md).

`encode` and `close` may come from different threads: the push of a converted frame and the
release of its buffers at close hold one lock.

A pipeline error is reported through `on_error`; the caller decides to rebuild or fall back.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import numpy as np

from . import yuv
from .codec import Codec
from .elements import SMALL_FRAME_PIXELS, ElementSpec
from .encoder import EncodedFrame, EncoderError, VideoEncoder
from .h264skip import SkipFrames

log = logging.getLogger("spicestream.video")
# Colour conversion costs about as much as x264 itself at 1080p (gstreamer-python.md); split
# across cores it halves the latency it adds (measured: p50 17 -> 12 ms at 1080p60, 2 cores).
CONVERT_THREADS = max(1, min(4, os.cpu_count() or 1))

try:
    from ..gstreamer import load

    GLib, Gst, GstAllocators, GstVideo = load("GLib", "Gst", "GstAllocators", "GstVideo")
except (ImportError, ValueError) as _exc:  # no GStreamer: the built-in MJPEG still works
    GLib = Gst = GstAllocators = GstVideo = None
    IMPORT_ERROR = str(_exc)
else:
    IMPORT_ERROR = ""
    from .gstbuffer import ReusedBuffers, push_frame

    _FORMAT_I420 = int(GstVideo.VideoFormat.I420)


_allocator = None


def _dmabuf_allocator():
    global _allocator
    if _allocator is None:
        _allocator = GstAllocators.DmaBufAllocator.new()
    return _allocator


def available() -> tuple[bool, str]:
    if Gst is None:
        return False, f"GStreamer (PyGObject) unavailable: {IMPORT_ERROR}"
    return True, Gst.version_string()


def element_exists(name: str) -> bool:
    return Gst is not None and Gst.ElementFactory.find(name) is not None


def pipeline_description(spec: ElementSpec, width: int, height: int, fps: int,
                         pixel_format: str = "BGRx", flip: bool = False, split: bool | None = None,
                         converted: bool = False) -> str:
    """`split`: conversion on CONVERT_THREADS threads and a queue before the encoder; by
    default for frames over SMALL_FRAME_PIXELS (bench/encode_cpu.py compares both).
    `converted`: frames arrive as I420 already (yuv.I420Converter), straight to the encoder."""
    # The caps carry a real frame rate: with framerate=0/1 x264enc holds every frame back
    # until the next one arrives (one frame of latency), and rate control needs the rate.
    caps_out = f" ! {spec.output_caps}" if spec.output_caps else ""
    # A property given twice takes its last value.
    is_small = width * height <= SMALL_FRAME_PIXELS
    small = f" {spec.small_frame_properties}" if is_small else ""
    # A small frame converts in well under a millisecond: splitting that across threads, and
    # handing the result to another thread to encode, costs more CPU than it saves time
    # (640x360 at 30 fps: 2.92 instead of 3.16 ms of CPU per frame, lower in 7 of 8
    # alternated runs: bench/encode_cpu.py --repeat 8).
    if split is None:
        split = not is_small
    threads, queue = (CONVERT_THREADS, "! queue max-size-buffers=2 max-size-bytes=0 max-size-time=0 ") \
        if split else (1, "")
    source = "appsrc name=src is-live=true format=time do-timestamp=false block=false caps="
    size = f"width={width},height={height},framerate={fps}/1"
    tail = (f"! {spec.element} name=enc {spec.properties}{small}{caps_out} "
            f"! appsink name=sink emit-signals=true sync=false max-buffers=8 drop=false")
    if converted:
        return f"{source}{yuv.CAPS},{size} {tail}"
    # (videoflip's older `method` property is accepted and ignored here: video-direction.)
    return (
        f"{source}video/x-raw,format={pixel_format},{size} "
        f"{'! videoflip video-direction=vert ' if flip else ''}"
        f"! videoconvert n-threads={threads} ! video/x-raw,format={spec.input_format} "
        f"{queue}{tail}"
    )


class GstEncoder(VideoEncoder):
    backend = "gstreamer"

    def __init__(self, spec: ElementSpec, width: int, height: int, bit_rate: int,
                 on_frame, on_error, fps: int = 30, pixel_format: str = "BGRx", flip: bool = False,
                 dmabuf: bool = False):
        """`dmabuf`: frames will be DMA-BUF scanouts, imported and converted inside GStreamer;
        frames in memory that the software encoders take as I420 are converted by libyuv."""
        if Gst is None:
            raise EncoderError(available()[1])
        if spec.output_caps and (width % 2 or height % 2):
            raise EncoderError(f"{spec.element} needs an even size, got {width}x{height}")
        super().__init__(spec.codec, width, height, bit_rate, on_frame, on_error, pixel_format)
        self.spec, self.element, self.hardware = spec, spec.element, spec.hardware
        self._pending: collections.deque = collections.deque()  # (timestamp, started, copied)
        self._pending_lock = threading.Lock()
        self._frame_index = 0
        self._skips = SkipFrames() if spec.codec == Codec.H264 else None
        self.fps = max(1, min(240, int(fps)))
        self._duration_ns = Gst.SECOND // self.fps
        self._i420 = yuv.I420Converter(width, height, pixel_format, flip) \
            if not dmabuf and spec.input_format == "I420" and yuv.converts(pixel_format) \
            and (spec.states_colorimetry or yuv.bt601_by_default(height)) else None
        try:
            self.pipeline = Gst.parse_launch(pipeline_description(
                spec, width, height, self.fps, pixel_format, flip, converted=self._i420 is not None))
        except GLib.Error as exc:
            raise EncoderError(f"{spec.element}: {exc}") from None
        self.src = self.pipeline.get_by_name("src")
        self._push_lock = threading.Lock()
        if self._i420 is not None:
            i420 = self._i420
            self._i420_buffers = ReusedBuffers(self.src, i420.size, _FORMAT_I420, width, height,
                                               i420.offsets, i420.strides)
        self.enc = self.pipeline.get_by_name("enc")
        self.sink = self.pipeline.get_by_name("sink")
        self._apply_bit_rate()
        # Signal handlers hold a reference to self: close() disconnects them, or the pipeline
        # and its fds would live as long as the process (a cycle the Python GC cannot see).
        self._sample_handler = self.sink.connect("new-sample", self._on_sample)
        self.bus = self.pipeline.get_bus()
        self.bus.enable_sync_message_emission()
        self._error_handler = self.bus.connect("sync-message::error", self._on_bus_error)
        if self.pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            self.close()  # disconnects the handlers, or the pipeline would never be freed
            raise EncoderError(f"{spec.element}: pipeline would not start")

    def _submit(self, frame: np.ndarray, timestamp_ms: int, started: float) -> None:
        pts = self._frame_index * self._duration_ns
        self._frame_index += 1
        with self._pending_lock:
            self._pending.append([timestamp_ms, started, 0])
        if self._i420 is not None:
            copied = self._push_converted(frame, pts)
        elif hasattr(frame, "drm_fourcc"):
            copied = self._push_dmabuf(frame, pts)
        else:
            copied = push_frame(self.src, frame, pts, self._duration_ns)
        with self._pending_lock:
            if self._pending:
                self._pending[-1][2] = copied

    def _push_converted(self, frame, pts: int) -> int:
        """Convert to I420 here and push that; the frame itself is not read after this returns.
        A scanout sent to an encoder made for frames in memory is mapped and read in place."""
        scanout = frame if hasattr(frame, "drm_fourcc") else None
        try:
            if scanout is not None and scanout.gst_format != self.pixel_format:
                raise EncoderError(f"a {scanout.gst_format} scanout for a {self.pixel_format} encoder")
            with self._push_lock:  # close() frees the buffers under it
                # An encoder lets go of its input only after its output has come back to us,
                # so more buffers than max_in_flight are out for a while: `limit` covers that.
                slot = self._i420_buffers.take()
                if slot is None:
                    raise EncoderError("every I420 buffer is in use" if not self.closed else "closed")
                copied = self._i420.convert(frame if scanout is None else scanout.pixels(), slot.address)
                self._i420_buffers.push(slot, pts, self._duration_ns)
        finally:
            if scanout is not None:
                scanout.release()
        return copied

    def _push_dmabuf(self, scanout, pts: int) -> int:
        """Import a DMA-BUF without copying: the memory owns a dup of the fd and closes it when
        GStreamer frees the buffer; the converter reads the buffer where it lies."""
        try:
            fd = scanout.dup()
        finally:
            scanout.release()  # the reference the caller passed in; the dup outlives it
        try:
            memory = GstAllocators.DmaBufAllocator.alloc(_dmabuf_allocator(), fd, scanout.size)
        except Exception:
            os.close(fd)  # the memory never took ownership of it
            raise
        if memory is None:
            os.close(fd)
            raise EncoderError("cannot import the DMA-BUF")
        buf = Gst.Buffer.new()
        buf.append_memory(memory)
        fmt = GstVideo.VideoFormat.from_string(scanout.gst_format)
        if scanout.gst_format == "NV12":
            offsets, strides, planes = [0, scanout.stride * scanout.height, 0, 0], [scanout.stride] * 2 + [0, 0], 2
        else:
            offsets, strides, planes = [0, 0, 0, 0], [scanout.stride, 0, 0, 0], 1
        GstVideo.buffer_add_video_meta_full(buf, GstVideo.VideoFrameFlags.NONE, fmt, scanout.width,
                                            scanout.height, planes, offsets, strides)
        buf.pts, buf.duration = pts, self._duration_ns
        if self.src.emit("push-buffer", buf) != Gst.FlowReturn.OK:
            raise EncoderError("appsrc refused the buffer")
        return 0

    def _on_sample(self, sink) -> "Gst.FlowReturn":
        sample = sink.emit("pull-sample")
        if sample is None:
            return Gst.FlowReturn.OK
        buf = sample.get_buffer()
        data = buf.extract_dup(0, buf.get_size())  # one copy of the small compressed frame
        key = not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)
        with self._pending_lock:
            entry = self._pending.popleft() if self._pending else [0, time.perf_counter(), 0]
        timestamp_ms, started, copied = entry
        follow_up = None
        if self._skips is not None:
            self._skips.observe(data)
            follow_up = self._skips.after()
        self._finished(EncodedFrame(data, timestamp_ms, key, self.width, self.height,
                                    (time.perf_counter() - started) * 1000, copied, follow_up))
        return Gst.FlowReturn.OK

    def _on_bus_error(self, bus, message) -> None:
        error, debug = message.parse_error()
        log.debug("%s pipeline error: %s (%s)", self.element, error.message, debug)
        with self._pending_lock:
            lost = len(self._pending)
            self._pending.clear()
        for _ in range(lost):
            self._finished(None)
        self._fail(f"{self.element}: {error.message}")

    def _apply_bit_rate(self) -> None:
        spec = self.spec
        if spec.rate_property is None:
            return
        prop = self.enc.find_property(spec.rate_property)
        value = self.bit_rate // spec.rate_unit
        value = max(prop.minimum, min(prop.maximum, value))
        self.enc.set_property(spec.rate_property, value)

    def set_bit_rate(self, bit_rate: int) -> None:
        super().set_bit_rate(bit_rate)
        if not self.closed:
            self._apply_bit_rate()

    def set_quality(self, quality: int) -> None:
        if self.spec.quality_property and not self.closed:
            self.enc.set_property(self.spec.quality_property, max(1, min(100, int(quality))))

    def force_key_frame(self) -> None:
        if self.closed:
            return
        # An upstream event, sent from the sink element: it travels up to the encoder.
        event = GstVideo.video_event_new_upstream_force_key_unit(Gst.CLOCK_TIME_NONE, True, 0)
        self.sink.send_event(event)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.pipeline.set_state(Gst.State.NULL)
        self.sink.disconnect(self._sample_handler)
        self.bus.disconnect(self._error_handler)
        self.bus.disable_sync_message_emission()
        with self._pending_lock:
            self._pending.clear()
        self._in_flight = 0
        if self._i420 is not None:
            with self._push_lock:  # not while a frame is being written into one of them
                self._i420_buffers.close()

