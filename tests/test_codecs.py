"""Codec lists, codec selection against client caps and preferences, and encoder probing."""

import subprocess
import sys

import pytest

from spicestream.protocol.constants import DisplayCap, caps_to_words
from spicestream.video.codec import Codec
from spicestream.video.codec_list import (
    CodecEntry, CodecListError, choose_codec, parse_codec_list, rank_by_preference)
from spicestream.video.elements import ElementSpec
from spicestream.video.factory import FALLBACK, VideoCodecs
from spicestream.video.probe import ProbeResult, probe_all

H264, VP8, MJPEG = CodecEntry("gstreamer", Codec.H264), CodecEntry("gstreamer", Codec.VP8), FALLBACK


def caps(*bits):
    return tuple(caps_to_words(bits))


GTK = caps(DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_VP8, DisplayCap.CODEC_H264)


@pytest.mark.parametrize("text,expect", [
    ("gstreamer:h264;spice:mjpeg", [H264, MJPEG]),
    (" gstreamer:H264 ; gstreamer:vp8 ;; spice:mjpeg; ", [H264, VP8, MJPEG]),
    ("gstreamer:h264;gstreamer:h264", [H264]),
    ("gstreamer:vp9;gstreamer:h265;gstreamer:mjpeg", [CodecEntry("gstreamer", Codec.VP9),
                                                      CodecEntry("gstreamer", Codec.H265),
                                                      CodecEntry("gstreamer", Codec.MJPEG)]),
])
def test_parse_good_lists(text, expect):
    assert parse_codec_list(text) == expect


@pytest.mark.parametrize("text,match", [
    ("", "empty"), (";;", "empty"), ("h264", "ENCODER:CODEC"), ("gstreamer:", "ENCODER:CODEC"),
    ("ffmpeg:h264", "unknown encoder 'ffmpeg'"), ("gstreamer:av1", "unknown codec 'av1'"),
    ("spice:h264", "cannot encode h264"), ("gstreamer:h264;bogus", "ENCODER:CODEC"),
])
def test_parse_bad_lists(text, match):
    with pytest.raises(CodecListError, match=match):
        parse_codec_list(text)


def test_cli_rejects_bad_list_with_status_2():
    result = subprocess.run([sys.executable, "-m", "spicestream", "serve", "--video-codecs", "x:y"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--video-codecs" in result.stderr and "unknown encoder" in result.stderr


def test_choose_follows_server_order_and_client_caps():
    entries = [H264, VP8, MJPEG]
    usable = set(entries)
    assert choose_codec(entries, GTK, usable) == H264
    no_h264 = caps(DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_VP8)
    assert choose_codec(entries, no_h264, usable) == VP8
    # Without MULTI_CODEC a client knows only MJPEG, whatever other bits it sets.
    assert choose_codec(entries, caps(DisplayCap.CODEC_H264), usable) == MJPEG
    assert choose_codec(entries, GTK, {VP8, MJPEG}) == VP8  # h264 not working here
    assert choose_codec(entries, GTK, usable, failed={H264, VP8}) == MJPEG
    assert choose_codec(entries, GTK, usable, failed={H264, VP8, MJPEG}) is None


def test_client_preference_reorders():
    entries = [H264, VP8, MJPEG]
    assert rank_by_preference(entries, [Codec.VP8]) == [VP8, H264, MJPEG]
    assert rank_by_preference(entries, [Codec.MJPEG, 99, Codec.VP8, Codec.MJPEG]) == [MJPEG, VP8, H264]
    assert choose_codec(entries, GTK, set(entries), preferred=[Codec.VP8]) == VP8
    # A preferred codec the client cannot decode is skipped.
    assert choose_codec(entries, GTK, set(entries), preferred=[Codec.VP9, Codec.MJPEG]) == MJPEG


def fake_probe(*usable_elements):
    rows = [ProbeResult("gstreamer", Codec.H264, "nvh264enc", True, False, "no device"),
            ProbeResult("gstreamer", Codec.H264, "x264enc", False, "x264enc" in usable_elements, "t"),
            ProbeResult("gstreamer", Codec.VP8, "vp8enc", False, "vp8enc" in usable_elements, "t")]
    return rows + [ProbeResult("spice", Codec.MJPEG, "simplejpeg", False, True, "built in")]


def test_builtin_mjpeg_is_always_the_last_resort():
    codecs = VideoCodecs("gstreamer:h264", probe=fake_probe())
    assert codecs.entries == [H264, MJPEG]
    assert codecs.choose(GTK) == MJPEG  # h264 not usable here
    codecs = VideoCodecs("gstreamer:h264;gstreamer:vp8", probe=fake_probe("x264enc", "vp8enc"))
    assert codecs.choose(GTK) == H264 and codecs.choose(GTK, failed={H264}) == VP8


def test_probe_reports_every_element_and_rejects_missing_hardware():
    results = probe_all()
    by_element = {r.element: r for r in results}
    for hw in ("nvh264enc", "vah264enc", "vaapih264enc", "qsvh264enc", "msdkh264enc"):
        row = by_element[hw]
        assert row.hardware and row.reason
        if not row.usable:
            assert "not registered" in row.reason or "test encode" in row.reason
    assert by_element["simplejpeg"].usable


def test_probe_survives_an_encoder_that_crashes_its_process(monkeypatch):
    """A driver that aborts the process must cost only its own row. GLib's fatal-warnings
    mode turns the out-of-range property below into a real abort of the probing child
    (SIGTRAP), the way a broken hardware driver would die; the next element is then probed
    by a fresh child."""
    from spicestream.video import gst_encoder

    if not gst_encoder.element_exists("jpegenc") or not gst_encoder.element_exists("vp8enc"):
        pytest.skip("needs jpegenc and vp8enc")
    monkeypatch.setenv("G_DEBUG", "fatal-warnings")
    crashing = ElementSpec("jpegenc", Codec.H264, "quality=1000", None, 1, hardware=True)
    working = ElementSpec("vp8enc", Codec.VP8, "deadline=1", "target-bitrate", 1)
    crashed, fine, builtin = probe_all([crashing, working], timeout=60)
    assert not crashed.usable and "crashed the process (SIG" in crashed.reason, crashed
    assert fine.usable and fine.reason == "test encode ok", fine
    assert builtin.element == "simplejpeg"


def test_codecs_command_prints_table():
    result = subprocess.run([sys.executable, "-m", "spicestream", "codecs"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["codec", "encoder", "element", "hardware", "usable", "reason"]
    assert any(line.split()[:2] == ["mjpeg", "spice"] for line in lines[1:])
    assert any("nvh264enc" in line and " true " in line for line in lines[1:])


def test_codec_switches_are_paced_with_an_injected_clock():
    from spicestream.video.codec_list import CODEC_SWITCH_INTERVAL_S, SwitchPacer

    pacer = SwitchPacer()
    assert pacer.request(now=10.0)  # the first switch: at once
    for i in range(1, 40):  # 20 changes a second for two seconds: none made at once
        assert not pacer.request(now=10.0 + i * 0.05) and pacer.pending
        if 10.0 + i * 0.05 < 10.0 + CODEC_SWITCH_INTERVAL_S:
            assert not pacer.due(now=10.0 + i * 0.05)
    assert pacer.due(now=10.0 + CODEC_SWITCH_INTERVAL_S)  # one, once the interval is over
    assert not pacer.pending and not pacer.due(now=100.0)


def test_x265_encoders_do_not_leak_when_rebuilt():
    """Every stream start or codec switch builds an encoder. libx265 3.5 leaked ~10 KB per
    x265 encoder closed with SAO off (the ultrafast preset's default): a client churning its
    codec preference grew the server without bound. With SAO on, what remains (~1-2 KB, an
    upstream leak in x265_encoder_open) is a fifth of it, and switches are paced besides."""
    import json
    import os

    pytest.importorskip("gi")
    from spicestream.video.gst_encoder import element_exists

    if not element_exists("x265enc"):
        pytest.skip("no x265enc here")
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, os.path.join(here, "x265_rebuilds.py"), "150"], capture_output=True,
                         text=True, timeout=240, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    per_rebuild = result["heap_growth_bytes"] / result["rebuilds"]
    print(f"\nx265 rebuilds: {per_rebuild / 1024:.1f} KiB of heap each")
    assert per_rebuild < 5 * 1024, result


@pytest.mark.parametrize("entry", [VP8, FALLBACK], ids=str)
def test_a_flipping_encoder_turns_the_picture_over(entry):
    """What a browser gets for a bottom-up scanout (spice-html5 ignores the top-down flag)."""
    import numpy as np

    from spicestream.testing.decoder import Gst, StreamDecoder
    from spicestream.video.encoder import encode_sync

    if Gst is None:
        pytest.skip("needs GStreamer")
    frame = np.zeros((240, 320, 4), np.uint8)
    frame[:60, :, :3] = 255  # white along the top
    codecs = VideoCodecs(str(entry))
    for flip, top, bottom in ((False, 255, 0), (True, 0, 255)):
        encoder = codecs.create(entry, 320, 240, 2_000_000, lambda f: None, print, 30, "BGRx", flip)
        try:
            data = encode_sync(encoder, frame, 1).data
        finally:
            encoder.close()
        decoder = StreamDecoder(entry.codec)
        try:
            picture = decoder.decode(data)
        finally:
            decoder.close()
        assert abs(int(picture[10, 10, 0]) - top) < 20 and abs(int(picture[230, 10, 0]) - bottom) < 20


def test_small_frames_are_converted_and_encoded_on_one_thread():
    """Below SMALL_FRAME_PIXELS the hand-offs cost more CPU than the overlap saves
    (bench/encode_cpu.py); large frames keep the split conversion and the queue."""
    from spicestream.video import gst_encoder
    from spicestream.video.elements import BY_NAME, SMALL_FRAME_PIXELS

    spec = BY_NAME["x264enc"]
    small = gst_encoder.pipeline_description(spec, 640, 360, 30)
    assert 640 * 360 <= SMALL_FRAME_PIXELS
    assert "videoconvert n-threads=1 " in small and "queue" not in small
    assert "threads=1 sliced-threads=false" in small
    large = gst_encoder.pipeline_description(spec, 1920, 1080, 60)
    assert f"videoconvert n-threads={gst_encoder.CONVERT_THREADS} " in large
    assert "! queue max-size-buffers=2 " in large
    assert "threads=1 sliced-threads=false" not in large
    if gst_encoder.element_exists("x264enc"):  # both layouts really run
        import numpy as np

        from spicestream.video.encoder import encode_sync

        for width, height in ((640, 360), (1280, 720)):
            encoder = gst_encoder.GstEncoder(spec, width, height, 2_000_000, lambda f: None, print)
            try:
                frame = np.zeros((height, width, 4), np.uint8)
                assert encode_sync(encoder, frame, 1).key
            finally:
                encoder.close()


def test_small_vp8_frames_are_encoded_on_one_libvpx_thread():
    """libvpx's second thread for a 640x360 frame costs more than it saves: vp8enc took 8.9
    ms of CPU a frame with threads=2 against 2.9-3.1 with threads=1 on this machine's CPUs
    (bench/glass_x11.py --sides spicestream --codecs vp8, 2 alternated pairs)."""
    from spicestream.video import gst_encoder
    from spicestream.video.elements import BY_NAME

    spec = BY_NAME["vp8enc"]
    for (width, height), threads in (((640, 360), 1), ((1920, 1080), 2)):
        text = gst_encoder.pipeline_description(spec, width, height, 30)
        assert [p for p in text.split() if p.startswith("threads=")][-1] == f"threads={threads}"
        if not gst_encoder.element_exists("vp8enc"):
            continue
        import numpy as np

        from spicestream.video.encoder import encode_sync

        encoder = gst_encoder.GstEncoder(spec, width, height, 2_000_000, lambda f: None, print)
        try:
            assert encoder.enc.get_property("threads") == threads  # the last value given wins
            assert encode_sync(encoder, np.zeros((height, width, 4), np.uint8), 1).key
        finally:
            encoder.close()


def test_a_closed_gstreamer_encoder_is_freed_with_its_pipeline():
    """The appsink reader's C callback and the bus handler refer back to the encoder: close()
    must cut both, or every stream start would keep a pipeline (threads, fds) for ever."""
    import gc
    import weakref

    import numpy as np

    from spicestream.video import gst_encoder
    from spicestream.video.elements import BY_NAME
    from spicestream.video.encoder import encode_sync

    if not gst_encoder.element_exists("x264enc"):
        pytest.skip("no x264enc")
    encoder = gst_encoder.GstEncoder(BY_NAME["x264enc"], 64, 64, 1_000_000, lambda f: None, print)
    assert encode_sync(encoder, np.zeros((64, 64, 4), np.uint8), 1).key
    probes = weakref.ref(encoder), weakref.ref(encoder.pipeline)
    encoder.close()
    del encoder
    gc.collect()
    assert [probe() for probe in probes] == [None, None]
