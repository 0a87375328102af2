"""The skipped picture sent after each H.264 frame (video/h264skip.py): exact bits, and in a
decoder fed as spice-gtk feeds it (caps without alignment), each frame comes out as soon as
its follow-up arrives, with its own presentation time, and the pictures are the encoder's."""

import time

import numpy as np
import pytest

from spicestream.video.gst_encoder import GstEncoder
from spicestream.video.elements import BY_NAME
from spicestream.video.encoder import encode_sync
from spicestream.video.h264skip import (
    BitReader, BitWriter, SkipFrames, escape, nal_spans, parse_pps, unescape)

Gst = pytest.importorskip("spicestream.testing.decoder").Gst
if Gst is None:
    pytest.skip("needs GStreamer", allow_module_level=True)


def test_exp_golomb_round_trip():
    w = BitWriter()
    values = [0, 1, 2, 3, 7, 8, 255, 3600, 65535]
    for v in values:
        w.ue(v)
    for v in (0, 1, -1, 5, -17):
        w.se(v)
    r = BitReader(w.rbsp())
    assert [r.ue() for _ in values] == values
    assert [r.se() for _ in range(5)] == [0, 1, -1, 5, -17]


def test_emulation_prevention_round_trip():
    raw = bytes([0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 3, 7, 0, 0])
    escaped = escape(raw)
    assert b"\x00\x00\x00" not in escaped and b"\x00\x00\x01" not in escaped
    assert unescape(escaped) == raw


def test_cabac_streams_get_no_skip_frame():
    w = BitWriter()
    w.ue(0), w.ue(0), w.u(1, 1)  # pps_id, sps_id, entropy_coding_mode_flag = CABAC
    skips = SkipFrames()
    skips.observe(b"\x00\x00\x00\x01\x68" + escape(w.rbsp()))
    assert skips.after() is None and skips.unsupported == "CABAC"
    with pytest.raises(ValueError):
        parse_pps(b"\x68" + w.rbsp())


def moving(k: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.zeros((h, w, 4), np.uint8)
    frame[..., 0] = (128 + 100 * np.sin(xx / 9 + k / 3)).astype(np.uint8)
    frame[..., 1] = (yy * 255 // h).astype(np.uint8)
    frame[..., 2] = 60
    frame[(k * 7) % (h - 20) :][:20, 40:80, :3] = 255
    return frame


@pytest.mark.parametrize("size", [(320, 240), (1280, 720)])
def test_each_frame_leaves_a_spice_gtk_like_parser_when_its_follow_up_arrives(size):
    w, h = size
    encoder = GstEncoder(BY_NAME["x264enc"], w, h, 2_000_000, lambda f: None, lambda m: None, 30)
    try:
        outputs = [encode_sync(encoder, moving(k, w, h), k + 1) for k in range(40)]
    finally:
        encoder.close()
    assert all(f.follow_up is not None for f in outputs)
    assert len(outputs[5].follow_up) < 32
    # spice-gtk's pipeline: appsrc caps are just the media type; decodebin finds the rest.
    pipeline = Gst.parse_launch(
        "appsrc name=src is-live=true format=time caps=video/x-h264 ! decodebin ! videoconvert "
        "! video/x-raw,format=BGRx ! appsink name=out sync=false max-buffers=200")
    src, sink = pipeline.get_by_name("src"), pipeline.get_by_name("out")
    pipeline.set_state(Gst.State.PLAYING)
    try:
        messages = [m for f in outputs for m in (f.data, f.follow_up)]
        decoded = []  # (pts index, picture)
        late = 0
        for index, payload in enumerate(messages):
            buf = Gst.Buffer.new_wrapped(payload)
            buf.pts = index * Gst.MSECOND
            src.emit("push-buffer", buf)
            deadline = time.monotonic() + 2
            # After a frame's follow-up, that frame must come out without any further input.
            while index % 2 == 1 and time.monotonic() < deadline:
                sample = sink.emit("try-pull-sample", Gst.SECOND // 10)
                if sample is not None:
                    out = sample.get_buffer()
                    picture = np.frombuffer(out.extract_dup(0, out.get_size()), np.uint8)
                    decoded.append((out.pts // Gst.MSECOND, picture.reshape(h, -1)[:, : w * 4]))
                if any(i == index - 1 for i, _ in decoded):
                    break
            else:
                late += index % 2 == 1
        assert late == 0, f"{late} frames waited for the next frame"
        frames = [(i, p) for i, p in decoded if i % 2 == 0]
        assert [i for i, _ in frames] == list(range(0, 80, 2)), "a frame got another's time"
        for i, picture in frames:  # each is the encoder's picture of its own frame
            source = moving(i // 2, w, h).reshape(h, -1)
            error = np.abs(picture.astype(int) - source.astype(int)).reshape(h, w, 4)[..., :3]
            assert error.mean() < 6, (i, error.mean())
    finally:
        pipeline.set_state(Gst.State.NULL)


def test_nal_spans_split_on_three_and_four_byte_start_codes():
    data = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x01\x67\x42\x00\x00\x00\x01\x68\xce"
    assert [data[begin:stop] for begin, stop in nal_spans(data)] == [b"\x09\xf0", b"\x67\x42", b"\x68\xce"]


def test_skip_pictures_are_reused_within_a_stream_and_follow_new_parameter_sets():
    # One follower across two encoders whose parameter sets have the same ids but other
    # sizes: each picture must be what a fresh follower of that stream writes.
    streams = []
    for w, h in ((320, 240), (640, 480)):
        encoder = GstEncoder(BY_NAME["x264enc"], w, h, 2_000_000, lambda f: None, lambda m: None, 30)
        try:
            streams.append([encode_sync(encoder, moving(k, w, h), k + 1).data for k in range(40)])
        finally:
            encoder.close()
    shared = SkipFrames()
    for units in streams:
        fresh = SkipFrames()
        for unit in units:
            shared.observe(unit)
            fresh.observe(unit)
            assert shared.after() == fresh.after() is not None
    # Within a stream, (frame_num, poc) pairs recur after each key frame: the same bytes.
    assert len(shared._written) < len(streams[1])
