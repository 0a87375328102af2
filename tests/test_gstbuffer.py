"""Zero-copy numpy -> appsrc hand-off (spicestream.video.gstbuffer)."""
import ctypes
import sys
import time
import weakref

import numpy as np
import pytest

gi = pytest.importorskip("gi")
try:
    gi.require_version("Gst", "1.0")
    gi.require_version("GstApp", "1.0")
    gi.require_version("GstVideo", "1.0")
    from gi.repository import Gst, GstVideo

    if not Gst.init_check(None)[0]:
        raise ImportError("Gst.init_check failed")
    for _name in ("appsrc", "appsink", "videoconvert", "fakesink"):
        if Gst.ElementFactory.find(_name) is None:
            raise ImportError(f"no {_name} element")
    from spicestream.video import gstbuffer
    from spicestream.video.gstbuffer import PushError, WrapStats, gobject_pointer, push_frame
except (ValueError, ImportError, OSError) as exc:
    pytest.skip(f"GStreamer unavailable: {exc}", allow_module_level=True)


# --- reading the pulled buffer's memory in C (PyGObject's map() copies) ----
class _MapInfo(ctypes.Structure):
    _fields_ = [("memory", ctypes.c_void_p), ("flags", ctypes.c_int),
                ("data", ctypes.c_void_p), ("size", ctypes.c_size_t),
                ("maxsize", ctypes.c_size_t), ("user_data", ctypes.c_void_p * 4),
                ("_reserved", ctypes.c_void_p * 4)]


_gst = ctypes.CDLL("libgstreamer-1.0.so.0")
_gstapp = ctypes.CDLL("libgstapp-1.0.so.0")
_gstapp.gst_app_sink_try_pull_sample.restype = ctypes.c_void_p
_gstapp.gst_app_sink_try_pull_sample.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
_gst.gst_sample_get_buffer.restype = ctypes.c_void_p
_gst.gst_sample_get_buffer.argtypes = [ctypes.c_void_p]
_gst.gst_buffer_map.restype = ctypes.c_int
_gst.gst_buffer_map.argtypes = [ctypes.c_void_p, ctypes.POINTER(_MapInfo), ctypes.c_int]
_gst.gst_buffer_unmap.restype = None
_gst.gst_buffer_unmap.argtypes = [ctypes.c_void_p, ctypes.POINTER(_MapInfo)]
_gst.gst_mini_object_unref.restype = None
_gst.gst_mini_object_unref.argtypes = [ctypes.c_void_p]

SECOND = Gst.SECOND


def _caps(w, h):
    return f"video/x-raw,format=BGRx,width={w},height={h},framerate=0/1"


def _run(desc):
    pipe = Gst.parse_launch(desc)
    assert pipe.set_state(Gst.State.PLAYING) != Gst.StateChangeReturn.FAILURE
    return pipe


def _stop(pipe):
    pipe.set_state(Gst.State.NULL)


def _pull(sink):
    sample = sink.try_pull_sample(5 * SECOND)
    assert sample is not None, "no sample within 5 s"
    return sample


def _surface(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)


def _convert_to_rgb(frame, w, h):
    """Push `frame` through videoconvert to RGB and return an (h, w, 3) array."""
    pipe = _run(f"appsrc name=src format=time caps={_caps(w, h)} ! videoconvert "
                "! video/x-raw,format=RGB ! appsink name=sink sync=false")
    try:
        copied = push_frame(pipe.get_by_name("src"), frame, pts_ns=0, duration_ns=SECOND)
        sample = _pull(pipe.get_by_name("sink"))
        info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
        raw = np.frombuffer(sample.get_buffer().extract_dup(0, info.size), np.uint8)
        stride = info.stride[0]
        out = np.lib.stride_tricks.as_strided(raw, (h, w, 3), (stride, 3, 1)).copy()
        return out, copied
    finally:
        _stop(pipe)


def test_appsrc_pointer_is_the_c_instance():
    src = Gst.ElementFactory.make("appsrc")
    # GstObject's name field lives in C; reading it back through the pointer
    # proves the capsule gives the instance address, not the wrapper's.
    _gst.gst_object_get_name.restype = ctypes.c_void_p
    _gst.gst_object_get_name.argtypes = [ctypes.c_void_p]
    _gst.g_free = ctypes.CDLL("libglib-2.0.so.0").g_free
    name_ptr = _gst.gst_object_get_name(gobject_pointer(src))
    assert ctypes.string_at(name_ptr).decode() == src.get_name()
    _gst.g_free(ctypes.c_void_p(name_ptr))


def test_zero_copy_points_at_numpy_memory_with_stride_meta_and_times():
    surface = _surface(120, 200)
    y, x, h, w = 7, 13, 50, 60
    region = surface[y:y + h, x:x + w]
    row = surface.strides[0]
    pipe = _run(f"appsrc name=src format=time caps={_caps(w, h)} "
                "! identity ! appsink name=sink sync=false")
    try:
        src, sink = pipe.get_by_name("src"), pipe.get_by_name("sink")
        assert push_frame(src, region, pts_ns=3 * SECOND, duration_ns=SECOND // 30) == 0

        sample = _gstapp.gst_app_sink_try_pull_sample(gobject_pointer(sink), 5 * SECOND)
        assert sample
        try:
            info = _MapInfo()
            buf = _gst.gst_sample_get_buffer(sample)
            assert _gst.gst_buffer_map(buf, ctypes.byref(info), int(Gst.MapFlags.READ))
            try:
                assert info.data == surface.ctypes.data + y * row + x * 4
                assert info.data == region.__array_interface__["data"][0]
                assert info.size == (h - 1) * row + w * 4
            finally:
                _gst.gst_buffer_unmap(buf, ctypes.byref(info))
        finally:
            _gst.gst_mini_object_unref(sample)

        # Second frame, read back through PyGObject: the struct fields we
        # wrote by offset and the video meta are what GStreamer sees.
        push_frame(src, region, pts_ns=12345, duration_ns=678)
        gbuf = _pull(sink).get_buffer()
        assert (gbuf.pts, gbuf.duration) == (12345, 678)
        assert gbuf.dts == Gst.CLOCK_TIME_NONE
        meta = GstVideo.buffer_get_video_meta(gbuf)
        assert (meta.width, meta.height, meta.n_planes) == (w, h, 1)
        assert meta.format == GstVideo.VideoFormat.BGRX
        assert meta.stride[0] == row and meta.offset[0] == 0
        del gbuf, meta
    finally:
        _stop(pipe)


@pytest.mark.parametrize("y,x,h,w", [(5, 3, 40, 37), (0, 0, 64, 80), (10, 0, 1, 17), (0, 9, 23, 1)])
def test_subregion_pixels_through_videoconvert(y, x, h, w):
    surface = _surface(96, 128, seed=y * 1000 + x)
    region = surface[y:y + h, x:x + w]
    assert region.strides[0] > w * 4 or h == 1
    rgb, copied = _convert_to_rgb(region, w, h)
    assert copied == 0
    np.testing.assert_array_equal(rgb, region[..., [2, 1, 0]])


def test_leak_check_10000_frames():
    surface = _surface(256, 256)
    base_refs = sys.getrefcount(surface)
    released = []
    pipe = _run(f"appsrc name=src format=time block=true max-bytes=200000 "
                f"caps={_caps(64, 64)} ! fakesink sync=false")
    src = pipe.get_by_name("src")
    wraps0, releases0, live0 = WrapStats.snapshot()
    probes = []
    for i in range(10_000):
        y, x = (i * 7) % 192, (i * 13) % 192
        view = surface[y:y + 64, x:x + 64]
        if i % 1000 == 0:
            probes.append(weakref.ref(view))
        push_frame(src, view, pts_ns=i * 1000, duration_ns=1000,
                   on_release=lambda: released.append(1))
    del view
    _stop(pipe)
    del pipe, src
    wraps, releases, live = WrapStats.snapshot()
    assert wraps - wraps0 == 10_000
    assert releases - releases0 == 10_000
    assert live == live0
    assert len(released) == 10_000
    assert all(p() is None for p in probes)
    assert sys.getrefcount(surface) == base_refs


def test_push_after_eos_raises_and_still_releases():
    pipe = _run(f"appsrc name=src format=time caps={_caps(8, 8)} ! fakesink sync=false")
    src = pipe.get_by_name("src")
    frame = _surface(8, 8)
    before = sys.getrefcount(frame)
    live0 = WrapStats.snapshot()[2]
    try:
        assert src.end_of_stream() == Gst.FlowReturn.OK
        with pytest.raises(PushError) as err:
            push_frame(src, frame)
        assert err.value.flow == Gst.FlowReturn.EOS
        assert WrapStats.snapshot()[2] == live0
        del err  # its traceback holds push_frame's locals, frame included
        assert sys.getrefcount(frame) == before
    finally:
        _stop(pipe)


def test_buffers_queued_in_an_idle_appsrc_are_released_with_it():
    src = Gst.ElementFactory.make("appsrc")  # NULL state still queues
    frame = _surface(8, 8)
    before = sys.getrefcount(frame)
    live0 = WrapStats.snapshot()[2]
    push_frame(src, frame)
    assert WrapStats.snapshot()[2] == live0 + 1
    del src
    assert WrapStats.snapshot()[2] == live0
    assert sys.getrefcount(frame) == before


def test_bad_arguments():
    src = Gst.ElementFactory.make("appsrc")
    with pytest.raises(TypeError):
        push_frame(Gst.ElementFactory.make("fakesink"), _surface(4, 4))
    for bad in (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint16),
                np.zeros((0, 4, 4), np.uint8), np.zeros((16, 4), np.uint8)):
        with pytest.raises(ValueError):
            push_frame(src, bad)


@pytest.mark.parametrize("layout", ["flipped_rows", "strided_pixels", "mirrored"])
def test_fallback_copies_only_the_region(layout):
    surface = _surface(80, 100, seed=4)
    region = {"flipped_rows": surface[10:50, 20:60][::-1],
              "strided_pixels": surface[10:50, 20:100:2],
              "mirrored": surface[10:50, 20:60][:, ::-1]}[layout]
    h, w = region.shape[:2]
    rgb, copied = _convert_to_rgb(region, w, h)
    assert copied == region.nbytes == h * w * 4
    np.testing.assert_array_equal(rgb, region[..., [2, 1, 0]])


def test_timing_1080p(capsys):
    """Informational: per-call cost, printed (run with -s), not asserted."""
    n = 200
    surface = _surface(1440, 2560)
    region = surface[100:1180, 200:2120]  # 1920x1080 view, stride 2560*4
    frame = np.ascontiguousarray(region)
    pipe = _run(f"appsrc name=src format=time block=true max-bytes=20000000 "
                f"caps={_caps(1920, 1080)} ! fakesink sync=false")
    src = pipe.get_by_name("src")

    def per_call(fn):
        fn(0)
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            fn(i)
        return (time.perf_counter() - t0) / n * 1e6

    try:
        t_view = per_call(lambda i: push_frame(src, region, pts_ns=i, duration_ns=1))
        t_contig = per_call(lambda i: push_frame(src, frame, pts_ns=i, duration_ns=1))
        data = frame.tobytes()
        t_bytes = per_call(lambda i: src.push_buffer(Gst.Buffer.new_wrapped(data)))
        t_tobytes = per_call(lambda i: src.push_buffer(Gst.Buffer.new_wrapped(region.tobytes())))
    finally:
        _stop(pipe)
    with capsys.disabled():
        print(f"\n1080p per call: push_frame(view, stride 10240) {t_view:.1f} us, "
              f"push_frame(contiguous) {t_contig:.1f} us, "
              f"new_wrapped(bytes)+push_buffer {t_bytes:.1f} us, "
              f"tobytes()+new_wrapped+push_buffer {t_tobytes:.1f} us")


def _encode_jpeg(frame):
    h, w = frame.shape[:2]
    pipe = _run(f"appsrc name=src format=time caps={_caps(w, h)} ! jpegenc "
                "! appsink name=sink sync=false")
    try:
        push_frame(pipe.get_by_name("src"), frame, pts_ns=0, duration_ns=SECOND)
        buf = _pull(pipe.get_by_name("sink")).get_buffer()
        return buf.extract_dup(0, buf.get_size())
    finally:
        _stop(pipe)


@pytest.mark.skipif(Gst.ElementFactory.find("jpegenc") is None, reason="no jpegenc")
def test_encoder_reads_strided_region_in_place():
    # jpegenc takes BGRx directly, so the encoder itself honours the video meta.
    surface = _surface(300, 400, seed=9)
    region = surface[17:257, 31:351]
    assert _encode_jpeg(region) == _encode_jpeg(np.ascontiguousarray(region))


def test_concurrent_pushers_keep_counters_consistent():
    import threading

    surface = _surface(128, 128)
    pipes = [_run(f"appsrc name=src format=time block=true max-bytes=100000 "
                  f"caps={_caps(32, 32)} ! fakesink sync=false") for _ in range(4)]
    wraps0, releases0, live0 = WrapStats.snapshot()

    def pusher(pipe, k):
        src = pipe.get_by_name("src")
        for i in range(2000):
            push_frame(src, surface[k * 32:(k + 1) * 32, (i % 96):(i % 96) + 32])

    threads = [threading.Thread(target=pusher, args=(p, k)) for k, p in enumerate(pipes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in pipes:
        _stop(p)
    wraps, releases, live = WrapStats.snapshot()
    assert (wraps - wraps0, releases - releases0, live) == (8000, 8000, live0)



def test_reused_buffers_come_back_only_when_nothing_else_refers_to_them():
    """A buffer is written again only when we hold its one reference and no copy shares its
    memory: a frame still queued or read downstream is never overwritten."""
    import gc

    from spicestream.video.gstbuffer import ReusedBuffers

    w, h = 16, 8
    size = w * h * 4
    pipe = _run(f"appsrc name=src format=time caps={_caps(w, h)} "
                "! appsink name=sink sync=false enable-last-sample=false")
    live0 = WrapStats.snapshot()[2]
    buffers = ReusedBuffers(pipe.get_by_name("src"), size, int(GstVideo.VideoFormat.BGRX), w, h,
                            (0,), (w * 4,), limit=3)
    sink = pipe.get_by_name("sink")
    try:
        pushed = []
        for k in range(3):  # queued in the appsink: none can be taken again
            slot = buffers.take()
            assert slot is not None and slot not in pushed
            slot.array[:] = k + 1
            buffers.push(slot, k * SECOND, SECOND)
            pushed.append(slot)
        assert buffers.take() is None and len(buffers.slots) == 3  # the limit holds
        samples = [_pull(sink) for _ in range(3)]
        got = [s.get_buffer() for s in samples]
        # each arrived as written, with its time (appsrc may pass a shallow copy)
        assert [b.extract_dup(0, b.get_size()) for b in got] == [bytes([k + 1]) * size for k in range(3)]
        assert [(b.pts, b.duration) for b in got] == [(k * SECOND, SECOND) for k in range(3)]
        del samples, got
    finally:
        _stop(pipe)
    # GStreamer lets go of everything (appsink keeps the last sample it gave out until freed)
    del pipe, sink
    gc.collect()
    try:
        assert all(slot._refs.value == slot._memory_refs.value == 1 for slot in pushed)
        # what an element does to a buffer it shares but must change: a shallow copy, another
        # buffer over the same memory; while it lives, that memory is not written
        _gst.gst_buffer_copy.restype = ctypes.c_void_p
        _gst.gst_buffer_copy.argtypes = [ctypes.c_void_p]
        copies = [_gst.gst_buffer_copy(slot.buffer) for slot in pushed[:2]]
        assert buffers.take() is pushed[2]
        _gst.gst_mini_object_unref(copies[1])
        assert buffers.take() is pushed[1]
        _gst.gst_mini_object_unref(copies[0])
        assert buffers.take() is pushed[0] and len(buffers.slots) == 3
        assert WrapStats.snapshot()[2] == live0 + 3
        # a push appsrc refuses (it is stopped) costs appsrc's reference, never ours
        with pytest.raises(PushError):
            buffers.push(pushed[0], 0, SECOND)
        assert pushed[0]._refs.value == 1 and buffers.take() is pushed[0]
    finally:
        buffers.close()
    assert WrapStats.snapshot()[2] == live0
    assert buffers.take() is None
    with pytest.raises(RuntimeError):
        buffers.push(pushed[0], 0, SECOND)  # its buffer is gone
