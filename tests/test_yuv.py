"""RGB -> I420 with libyuv for the software encoders (spicestream.video.yuv)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from spicestream.video import yuv

gi = pytest.importorskip("gi")
try:
    from spicestream.testing.decoder import StreamDecoder
    from spicestream.video import gst_encoder
    from spicestream.video.codec import Codec
    from spicestream.video.elements import BY_NAME
    from spicestream.video.encoder import encode_sync
    from spicestream.video.gstbuffer import WrapStats

    Gst, GstVideo = gst_encoder.Gst, gst_encoder.GstVideo
    if Gst is None:
        raise ImportError(gst_encoder.IMPORT_ERROR)
except (ImportError, ValueError, OSError) as exc:
    pytest.skip(f"GStreamer unavailable: {exc}", allow_module_level=True)

needs_libyuv = pytest.mark.skipif(not yuv.converts("BGRx"), reason=yuv.UNAVAILABLE or "no libyuv")
# Saturated and mid colours (B, G, R): a decoder converting back with another matrix than the
# one we converted with (BT.709 against BT.601) is off by 15-40 levels on most of these.
BARS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0),
        (255, 255, 255), (40, 90, 200), (200, 60, 30), (128, 128, 128), (0, 0, 0)]


def bars(width: int, height: int) -> np.ndarray:
    frame = np.zeros((height, width, 4), np.uint8)
    edges = np.linspace(0, width, len(BARS) + 1).astype(int) // 16 * 16
    for (b, g, r), x0, x1 in zip(BARS, edges, edges[1:]):
        frame[:, x0:x1, :3] = (b, g, r)
    return frame, edges


def videoconvert_i420(frame: np.ndarray, pixel_format: str) -> np.ndarray:
    """What videoconvert makes of `frame` as BT.601 I420 (GStreamer's own layout)."""
    h, w = frame.shape[:2]
    pipe = Gst.parse_launch(
        f"appsrc name=src format=time caps=video/x-raw,format={pixel_format},width={w},height={h},"
        f"framerate=0/1 ! videoconvert ! {yuv.CAPS},width={w},height={h} ! appsink name=sink sync=false")
    pipe.set_state(Gst.State.PLAYING)
    try:
        pipe.get_by_name("src").emit("push-buffer", Gst.Buffer.new_wrapped(frame.tobytes()))
        sample = pipe.get_by_name("sink").emit("try-pull-sample", 5 * Gst.SECOND)
        assert sample is not None
        buf = sample.get_buffer()
        return np.frombuffer(buf.extract_dup(0, buf.get_size()), np.uint8)
    finally:
        pipe.set_state(Gst.State.NULL)


def decoded(encoder, codec, frame, times: int = 1):
    """Encode `frame` `times` times (rate control settles on the first frames) and decode the
    stream as spice-gtk does; the last picture."""
    decoder = StreamDecoder(codec)
    try:
        for i in range(times):
            picture = decoder.decode(encode_sync(encoder, frame, i).data)
    finally:
        decoder.close()
    return picture


def memfd_scanout(pixels: np.ndarray, code: str):
    """A scanout over a memfd holding `pixels` ((h, w, 4), rows packed)."""
    import mmap

    from spicestream.display.scanout import Scanout, fourcc

    h, w = pixels.shape[:2]
    fd = os.memfd_create("scanout")
    try:
        os.ftruncate(fd, pixels.nbytes)
        with mmap.mmap(fd, pixels.nbytes) as m:
            m[:] = pixels.tobytes()
        return Scanout(fd, w, h, w * 4, fourcc(code))
    finally:
        os.close(fd)


def feeder(encoder) -> str:
    """What converts the frames for the encoder element: "videoconvert", or "appsrc" (none)."""
    element = encoder.enc
    while True:
        element = element.get_static_pad("sink").get_peer().get_parent_element()
        name = element.get_factory().get_name()
        if name in ("appsrc", "videoconvert"):
            return name


def planes(i420: np.ndarray, width: int, height: int):
    (y, u, v), (ys, cs, _), _ = yuv.i420_layout(width, height)
    cw, ch = (width + 1) // 2, (height + 1) // 2
    return (i420[y:y + ys * height].reshape(height, ys)[:, :width].astype(int),
            i420[u:u + cs * ch].reshape(ch, cs)[:, :cw].astype(int),
            i420[v:v + cs * ch].reshape(ch, cs)[:, :cw].astype(int))


@pytest.mark.parametrize("size", [(640, 360), (641, 361), (1280, 720), (3, 5), (2, 2)])
def test_the_i420_layout_is_gstreamers(size):
    info = GstVideo.VideoInfo.new()
    info.set_format(GstVideo.VideoFormat.I420, *size)
    offsets, strides, total = yuv.i420_layout(*size)
    assert (offsets, strides, total) == (tuple(info.offset[:3]), tuple(info.stride[:3]), info.size)


@needs_libyuv
@pytest.mark.parametrize("pixel_format", ["BGRx", "RGBx", "BGRA", "RGBA"])
@pytest.mark.parametrize("size", [(320, 240), (162, 98), (163, 99)])
def test_libyuv_converts_as_videoconvert_does(pixel_format, size):
    """Same matrix, same range, same plane order for every byte order: 2x2 blocks of one
    colour each, so the chroma filter does not matter, and every value within rounding."""
    w, h = size
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, ((h + 1) // 2, (w + 1) // 2, 4), dtype=np.uint8)
    frame = np.ascontiguousarray(blocks.repeat(2, axis=0).repeat(2, axis=1)[:h, :w])
    out = np.empty(yuv.i420_layout(w, h)[2], np.uint8)
    assert yuv.I420Converter(w, h, pixel_format).convert(frame, out.ctypes.data) == 0
    for ours, theirs in zip(planes(out, w, h), planes(videoconvert_i420(frame, pixel_format), w, h)):
        assert np.abs(ours - theirs).max() <= 2


@needs_libyuv
@pytest.mark.parametrize("height", [60, 61])
def test_strided_views_and_flips_convert_in_place(height):
    surface = np.random.default_rng(3).integers(0, 256, (100, 300, 4), dtype=np.uint8)
    view = surface[10:10 + height, 20:140]  # rows 1200 bytes apart
    converter = yuv.I420Converter(120, height, "BGRx")
    straight, again, flipped = (np.empty(converter.size, np.uint8) for _ in range(3))
    assert converter.convert(view, straight.ctypes.data) == 0
    expect = planes(straight, 120, height)
    converter.convert(np.ascontiguousarray(view), again.ctypes.data)
    assert all((a == b).all() for a, b in zip(planes(again, 120, height), expect))
    # turned over: the flipped frame's planes are those of the frame read bottom-up
    yuv.I420Converter(120, height, "BGRx", flip=True).convert(view, flipped.ctypes.data)
    converter.convert(np.ascontiguousarray(view[::-1]), again.ctypes.data)
    assert all((a == b).all() for a, b in zip(planes(flipped, 120, height), planes(again, 120, height)))
    if height % 2 == 0:  # and with rows in pairs, the planes turned over
        assert all((a == b[::-1]).all() for a, b in zip(planes(flipped, 120, height), expect))
    # a layout libyuv cannot read (pixels not 4 bytes apart) is made compact first, and counted
    assert converter.convert(surface[10:10 + height, 20:260:2], again.ctypes.data) == 120 * height * 4


@needs_libyuv
@pytest.mark.parametrize("element,size,converted", [
    ("x264enc", (320, 240), True), ("x264enc", (1280, 720), True),  # the VUI says BT.601
    ("vp8enc", (320, 240), True), ("vp8enc", (640, 576), True),
    ("vp8enc", (1280, 720), False),  # vp8dec assumes BT.709 from 577 lines: videoconvert's
    ("x265enc", (1280, 720), True),  # the VUI, as x264
    ("vp9enc", (1280, 720), False), ("openh264enc", (1280, 720), False),  # no colorimetry sent
])
def test_encoders_fed_from_memory_decode_to_the_colours_sent(element, size, converted):
    """libyuv's BT.601 goes only where the decoder converts back with BT.601, as spice-gtk's
    GStreamer decoders do: the decoded bars are the colours sent, with or without libyuv."""
    if not gst_encoder.element_exists(element):
        pytest.skip(f"no {element}")
    w, h = size
    spec = BY_NAME[element]
    encoder = gst_encoder.GstEncoder(spec, w, h, 20_000_000, lambda f: None, print)
    try:
        assert (feeder(encoder), encoder._i420 is not None) == \
            (("appsrc", True) if converted else ("videoconvert", False))
        frame, edges = bars(w, h)
        picture = decoded(encoder, spec.codec, frame, times=3)
        assert picture is not None
    finally:
        encoder.close()
    for (b, g, r), x0, x1 in zip(BARS, edges, edges[1:]):
        inner = picture[h // 4: 3 * h // 4, x0 + 4: x1 - 4, :3].reshape(-1, 3).mean(axis=0)
        assert np.abs(inner - (b, g, r)).max() <= 8, ((b, g, r), inner.round(1))


@needs_libyuv
def test_i420_buffers_are_reused_and_all_freed_at_close():
    if not gst_encoder.element_exists("x264enc"):
        pytest.skip("no x264enc")
    live0 = WrapStats.snapshot()[2]
    encoder = gst_encoder.GstEncoder(BY_NAME["x264enc"], 320, 240, 2_000_000, lambda f: None, print)
    try:
        frame = np.zeros((240, 320, 4), np.uint8)
        for i in range(40):
            frame[:, :, 1] = i * 5
            encode_sync(encoder, frame, i)
        # encode_sync waits for each frame; the encoder lets go of its input a moment after
        # its output came back: a few buffers serve them all
        assert 1 <= len(encoder._i420_buffers.slots) <= encoder._i420_buffers.limit
        assert WrapStats.snapshot()[2] == live0 + len(encoder._i420_buffers.slots)
        assert encoder.stats()["copied_bytes"] == 0
    finally:
        encoder.close()
    assert WrapStats.snapshot()[2] == live0


def test_without_libyuv_the_encoders_convert_with_videoconvert(monkeypatch):
    """The fallback is real: a machine without libyuv encodes through videoconvert."""
    monkeypatch.setattr(yuv, "converts", lambda pixel_format: False)
    if not gst_encoder.element_exists("x264enc"):
        pytest.skip("no x264enc")
    w, h = 320, 240
    encoder = gst_encoder.GstEncoder(BY_NAME["x264enc"], w, h, 20_000_000, lambda f: None, print)
    try:
        assert feeder(encoder) == "videoconvert" and encoder._i420 is None
        frame, edges = bars(w, h)
        picture = decoded(encoder, Codec.H264, frame, times=3)
    finally:
        encoder.close()
    x0, x1 = edges[0], edges[1]
    assert np.abs(picture[100, x0 + 4: x1 - 4, :3].mean(axis=0) - BARS[0]).max() <= 8


def test_libyuv_can_be_turned_off_for_comparisons():
    out = subprocess.run([sys.executable, "-c", "from spicestream.video import yuv; "
                          "print(yuv.converts('BGRx'), yuv.UNAVAILABLE)"],
                         env={**os.environ, "SPICESTREAM_LIBYUV": "0"}, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith("False turned off")


@needs_libyuv
def test_a_scanout_for_an_encoder_made_for_memory_is_mapped_converted_and_released():
    """Streams choose `dmabuf` by whether the display has a scanout; if one arrives anyway it
    is read in place, converted, and its reference given back at once."""
    if not gst_encoder.element_exists("x264enc"):
        pytest.skip("no x264enc")
    w, h = 320, 240
    frame, edges = bars(w, h)
    scanout = memfd_scanout(frame, "XR24")
    encoder = gst_encoder.GstEncoder(BY_NAME["x264enc"], w, h, 20_000_000, lambda f: None, print)
    try:
        assert scanout.acquire() is scanout  # the reference encode() takes over
        picture = decoded(encoder, Codec.H264, scanout)
    finally:
        encoder.close()
    assert not scanout.closed
    scanout.release()  # ours: the last one
    assert scanout.closed
    inner = picture[60:180, edges[1] + 4: edges[2] - 4, :3].reshape(-1, 3).mean(axis=0)
    assert np.abs(inner - BARS[1]).max() <= 8


@needs_libyuv
def test_a_scanout_in_another_byte_order_is_refused_not_converted_wrongly():
    if not gst_encoder.element_exists("x264enc"):
        pytest.skip("no x264enc")
    scanout = memfd_scanout(np.zeros((64, 64, 4), np.uint8), "XB24")  # RGBx
    errors = []
    encoder = gst_encoder.GstEncoder(BY_NAME["x264enc"], 64, 64, 1_000_000, lambda f: None, errors.append)
    try:
        assert not encoder.encode(scanout, 1)  # the reference it was given is released...
        assert errors and "RGBx scanout for a BGRx encoder" in errors[0]
    finally:
        encoder.close()
    assert scanout.closed  # ...and it was the last one

