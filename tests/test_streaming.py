"""Video streams end to end with the headless client, which decodes them with GStreamer."""

import time

import numpy as np
import pytest

import spicestream
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.constants import DisplayCap
from spicestream.protocol.messages import CLIENT, SERVER
from spicestream.testing.client import TestClient
from spicestream.testing.decoder import psnr
from spicestream.video.codec import Codec

pytest.importorskip("gi")

W, H = 320, 240
REGION = (64, 64, 192, 128)  # x, y, w, h: tile-aligned, so the stream covers exactly this
ALL_CODECS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
              DisplayCap.LZ4_COMPRESSION, DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG,
              DisplayCap.CODEC_VP8, DisplayCap.CODEC_H264, DisplayCap.CODEC_VP9,
              DisplayCap.CODEC_H265, DisplayCap.PREF_VIDEO_CODEC_TYPE)

# PSNR floors per codec for the moving test picture below, at the starting bit rate.
PSNR_FLOOR = {Codec.MJPEG: 30.0, Codec.H264: 30.0, Codec.VP8: 28.0, Codec.VP9: 28.0, Codec.H265: 30.0}


def background():
    y, x = np.mgrid[0:H, 0:W]
    frame = np.zeros((H, W, 4), np.uint8)
    frame[..., 0] = (x * 255 // W).astype(np.uint8)
    frame[..., 1] = (y * 255 // H).astype(np.uint8)
    frame[..., 2] = 90
    frame[..., 3] = 255
    return frame


def moving_picture(k: int):
    """A smooth picture that moves: colour waves plus a bright square sliding across."""
    frame = background()
    x0, y0, w, h = REGION
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frame[y0 : y0 + h, x0 : x0 + w, 0] = (128 + 100 * np.sin(xx / 13 + k / 4)).astype(np.uint8)
    frame[y0 : y0 + h, x0 : x0 + w, 1] = (128 + 100 * np.sin(yy / 11 - k / 5)).astype(np.uint8)
    frame[y0 : y0 + h, x0 : x0 + w, 2] = (128 + 100 * np.sin((xx + yy) / 17 + k / 3)).astype(np.uint8)
    sx = x0 + (k * 6) % (w - 24)
    frame[y0 + 40 : y0 + 64, sx : sx + 24, :3] = 250
    return frame


def kinds(client):
    return [type(m) for m in client.messages]


def created(client):
    return [m for m in client.messages if type(m) is SERVER.DISPLAY_STREAM_CREATE]


def play_until_stream(server, client, start=0, timeout=10.0):
    """Draw moving frames at ~30 fps until the client has a stream; returns the next k."""
    k, deadline = start, time.monotonic() + timeout
    while not client.streams:
        if time.monotonic() > deadline:
            raise TimeoutError("no stream was created")
        server.display.update(moving_picture(k), damage=[REGION])
        k += 1
        time.sleep(1 / 30)
    return k


def lockstep(server, client, k, frames=8):
    """Publish one frame at a time and wait for its stream frame; returns PSNRs."""
    time.sleep(0.2)  # let frames already in flight arrive
    results = []
    x, y, w, h = REGION
    for i in range(frames):
        before = len(client.stream_log)
        source = moving_picture(k + i)
        server.display.update(source, damage=[REGION])
        client.wait_for(lambda c: len(c.stream_log) > before, timeout=5, what="a stream frame")
        picture = client.stream_log[-1]["picture"]
        assert picture is not None, "decoder produced no picture"
        results.append(psnr(picture, source[y : y + h, x : x + w]))
    return results


@pytest.fixture
def make_server():
    servers = []

    def _make(codecs, mode="all"):
        srv = spicestream.Server(port=0, width=W, height=H, video_codecs=codecs, streaming_video=mode)
        srv.start()
        srv.display.update(background())
        servers.append(srv)
        return srv

    yield _make
    for srv in servers:
        srv.stop()


@pytest.mark.parametrize("codecs,codec", [
    ("spice:mjpeg", Codec.MJPEG), ("gstreamer:mjpeg", Codec.MJPEG), ("gstreamer:h264", Codec.H264),
    ("gstreamer:vp8", Codec.VP8), ("gstreamer:vp9", Codec.VP9), ("gstreamer:h265", Codec.H265),
])
def test_stream_decodes_close_to_source(make_server, codecs, codec):
    server = make_server(codecs)
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        create = created(client)[0]
        assert create.codec_type == codec
        x, y, w, h = REGION
        assert (create.dest.left, create.dest.top, create.dest.right, create.dest.bottom) == (x, y, x + w, y + h)
        assert create.flags == 1 and create.clip is None  # TOP_DOWN, fully visible
        assert SERVER.DISPLAY_STREAM_ACTIVATE_REPORT in kinds(client)
        values = lockstep(server, client, k)
        assert min(values) >= PSNR_FLOOR[codec], values
        assert SERVER.DISPLAY_STREAM_DATA_SIZED in kinds(client)  # the client has SIZED_STREAM
        # Zero copies from the application: the region is encoded in place.
        active = server.stats()["clients"][0]["streams"]["active"]
        assert active["copied_bytes"] == 0 and active["frames_sent"] > 0
        # Key frame first (every JPEG is one).
        assert active["key_frames"] >= 1


def test_stream_ends_when_still_and_leaves_exact_pixels(make_server):
    server = make_server("gstreamer:h264")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        last = moving_picture(k)
        server.display.update(last, damage=[REGION])
        client.wait_for(lambda c: SERVER.DISPLAY_STREAM_DESTROY in kinds(c), timeout=5, what="destroy")
        client.wait_for(lambda c: (c.frame[..., :3] == last[..., :3]).all(), timeout=5,
                        what="lossless pixels after the stream")
        # The lossless refresh came after the destroy.
        order = kinds(client)
        destroy_at = order.index(SERVER.DISPLAY_STREAM_DESTROY)
        assert SERVER.DISPLAY_DRAW_COPY in order[destroy_at:]


def test_content_outside_the_stream_stays_lossless(make_server):
    server = make_server("gstreamer:h264")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        draws = client.draws
        frame = moving_picture(k)
        frame[200:210, 10:30] = (0, 0, 255, 255)  # outside REGION
        server.display.update(frame, damage=[REGION, (10, 200, 20, 10)])
        client.wait_for(lambda c: (c.frame[200:210, 10:30, :3] == (0, 0, 255)).all(), what="lossless")
        assert client.draws > draws


def test_full_screen_change_streams_the_whole_surface(make_server):
    server = make_server("gstreamer:h264")
    rng = np.random.default_rng(0)
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        deadline = time.monotonic() + 10
        base = background()
        k = 0
        while not client.streams and time.monotonic() < deadline:
            frame = np.roll(base, k * 4, axis=1)
            frame[rng.integers(0, H), :, :3] = 255
            server.display.update(frame)
            k += 1
            time.sleep(1 / 30)
        create = created(client)[0]
        assert (create.dest.left, create.dest.top, create.dest.right, create.dest.bottom) == (0, 0, W, H)


def test_client_without_multi_codec_gets_mjpeg(make_server):
    server = make_server("gstreamer:h264;gstreamer:vp8;spice:mjpeg")
    caps = (DisplayCap.MONITORS_CONFIG, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_H264)
    with TestClient("127.0.0.1", server.port, display_caps=caps) as client:
        client.wait_for(lambda c: c.marked)
        play_until_stream(server, client)
        assert created(client)[0].codec_type == Codec.MJPEG
        # Without SIZED_STREAM the frames go out as plain STREAM_DATA.
        client.wait_for(lambda c: SERVER.DISPLAY_STREAM_DATA in kinds(c))
        assert SERVER.DISPLAY_STREAM_DATA_SIZED not in kinds(client)


def test_unsupported_report_moves_to_the_next_codec(make_server):
    server = make_server("gstreamer:h264;gstreamer:vp8;spice:mjpeg")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        first = created(client)[0]
        assert first.codec_type == Codec.H264
        report = next(m for m in client.messages if type(m) is SERVER.DISPLAY_STREAM_ACTIVATE_REPORT)
        # A stale report (wrong unique id) is ignored...
        client.send(Ch.DISPLAY, CLIENT.DISPLAY_STREAM_REPORT(first.id, report.unique_id ^ 1, 0, 0, 0,
                                                             0xFFFFFFFF, 0, 0xFFFFFFFF))
        # ...the real "cannot decode" report moves this client to VP8, then MJPEG.
        for expect in (Codec.VP8, Codec.MJPEG):
            current = created(client)[-1]
            activate = [m for m in client.messages if type(m) is SERVER.DISPLAY_STREAM_ACTIVATE_REPORT][-1]
            client.send(Ch.DISPLAY, CLIENT.DISPLAY_STREAM_REPORT(current.id, activate.unique_id, 0, 0, 0,
                                                                 0xFFFFFFFF, 0, 0xFFFFFFFF))
            deadline = time.monotonic() + 10
            while len(created(client)) < 2 + (expect == Codec.MJPEG) and time.monotonic() < deadline:
                server.display.update(moving_picture(k), damage=[REGION])
                k += 1
                time.sleep(1 / 30)
            assert created(client)[-1].codec_type == expect
        assert sorted(server.stats()["clients"][0]["streams"]["failed_codecs"]) == ["gstreamer:h264", "gstreamer:vp8"]


def test_preferred_codec_type_is_honoured(make_server):
    server = make_server("gstreamer:h264;gstreamer:vp8;spice:mjpeg")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        client.send(Ch.DISPLAY, CLIENT.DISPLAY_PREFERRED_VIDEO_CODEC_TYPE((Codec.VP8, Codec.H264)))
        play_until_stream(server, client)
        assert created(client)[0].codec_type == Codec.VP8


def test_filter_mode_ignores_a_ticking_clock_but_streams_video(make_server):
    server = make_server("spice:mjpeg", mode="filter")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        # A small, two-colour area changing fast (a progress bar / clock): no stream.
        frame = background()
        for k in range(45):
            frame = frame.copy()
            frame[0:16, 0:40, :3] = 255 if k % 2 else 0
            server.display.update(frame, damage=[(0, 0, 40, 16)])
            time.sleep(1 / 30)
        assert not created(client)
        play_until_stream(server, client)  # the colourful moving region does become one


def test_streaming_off_never_streams(make_server):
    server = make_server("gstreamer:h264", mode="off")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        for k in range(40):
            server.display.update(moving_picture(k), damage=[REGION])
            time.sleep(1 / 60)
        last = moving_picture(40)
        server.display.update(last, damage=[REGION])
        client.wait_for(lambda c: (c.frame[..., :3] == last[..., :3]).all())
        assert not created(client)


def inject_pipeline_error(server):
    """Post a real GStreamer ERROR on the active encoder's bus, as a failing element would."""
    from gi.repository import GLib, Gst

    channel = next(iter(server._core.display_channels))
    encoder = channel.streams.active.encoder.encoder  # the real encoder behind the subscription
    error = GLib.Error.new_literal(Gst.CoreError.quark(), "injected failure", Gst.CoreError.FAILED)
    encoder.pipeline.get_bus().post(Gst.Message.new_error(encoder.enc, error, "test"))
    return encoder


def test_pipeline_error_rebuilds_once_then_switches_codec(make_server):
    server = make_server("gstreamer:h264;gstreamer:vp8")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        channel = next(iter(server._core.display_channels))
        first = inject_pipeline_error(server)
        deadline = time.monotonic() + 5
        while channel.streams.active.encoder.encoder is first and time.monotonic() < deadline:
            time.sleep(0.01)
        rebuilt = channel.streams.active.encoder.encoder
        assert rebuilt is not first and first.closed  # same stream, new pipeline
        assert len(created(client)) == 1
        frames = len(client.stream_log)
        for _ in range(10):  # the rebuilt encoder keeps the stream going
            server.display.update(moving_picture(k), damage=[REGION])
            k += 1
            time.sleep(1 / 30)
        client.wait_for(lambda c: len(c.stream_log) > frames + 3)
        inject_pipeline_error(server)  # second failure: next codec
        deadline = time.monotonic() + 10
        while len(created(client)) < 2 and time.monotonic() < deadline:
            server.display.update(moving_picture(k), damage=[REGION])
            k += 1
            time.sleep(1 / 30)
        assert [m.codec_type for m in created(client)] == [Codec.H264, Codec.VP8]
        assert server.stats()["clients"][0]["streams"]["failed_codecs"] == ["gstreamer:h264"]


def test_codec_preference_churn_rebuilds_the_encoder_at_most_once_per_interval(make_server):
    """A client flipping its preferred codec 20 times a second: the server switches at once,
    then at most once per interval, ending on what the client prefers last."""
    from spicestream.video.codec_list import CODEC_SWITCH_INTERVAL_S

    server = make_server("gstreamer:h264;gstreamer:vp8;spice:mjpeg")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        before = len(created(client))
        started = time.monotonic()
        flips = 0
        next_at = started
        while time.monotonic() - started < 3.0:  # paced by deadline: a frame and a flip per tick
            prefer = (Codec.VP8, Codec.H264) if flips % 2 == 0 else (Codec.H264, Codec.VP8)
            client.send(Ch.DISPLAY, CLIENT.DISPLAY_PREFERRED_VIDEO_CODEC_TYPE(prefer))
            flips += 1
            server.display.update(moving_picture(k), damage=[REGION])
            k += 1
            next_at += 0.05
            time.sleep(max(0.0, next_at - time.monotonic()))
        elapsed = time.monotonic() - started
        # Then hold the last preference until the pending switch is made.
        deadline = time.monotonic() + CODEC_SWITCH_INTERVAL_S * 3
        last = Codec.H264 if (flips - 1) % 2 else Codec.VP8
        while created(client)[-1].codec_type != last and time.monotonic() < deadline:
            server.display.update(moving_picture(k), damage=[REGION])
            k += 1
            time.sleep(1 / 30)
        switches = len(created(client)) - before
        assert flips >= 40
        # One at once, then one per interval at most (the count of intervals that started).
        assert 1 <= switches <= 2 + int((time.monotonic() - started) / CODEC_SWITCH_INTERVAL_S), (switches, elapsed)
        assert created(client)[-1].codec_type == last


def test_stamps_keep_pace_across_the_media_clock_wrap(make_server):
    """The server's media clock is set 1.5 s before its 2^32 ms wrap: the stream goes on across
    it with stamps a frame apart (not 1 ms apart) and frames on time at the client, whose clock
    wraps with it. The stamping rule itself is unit-tested with a synthetic clock
    (test_stream_policy.py); this shows the server feeds it an unwrapped clock."""
    server = make_server("gstreamer:h264")
    server._core._epoch = time.monotonic() - (2**32 - 1500) / 1000
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            server.display.update(moving_picture(k), damage=[REGION])
            k += 1
            time.sleep(1 / 30)
        # Frames, not the ~16-byte pictures that follow each H.264 frame (video/h264skip.py).
        log = [e for e in client.stream_log if e["margin_ms"] is not None and e["size"] > 64]
        stamps = [e["mm_time"] for e in log]
        assert any(s > 2**32 - 3000 for s in stamps) and any(s < 10_000 for s in stamps), "no wrap seen"
        steps = [((b - a + 2**31) % 2**32) - 2**31 for a, b in zip(stamps, stamps[1:])]
        gaps_ms = [(b["arrival"] - a["arrival"]) * 1000 for a, b in zip(log, log[1:])]
        assert min(steps) >= 1, "a stamp went backwards"
        # Stamps follow the frames' pace (a median step of 1 ms was the old wrap bug).
        assert np.median(steps) >= 0.5 * np.median(gaps_ms), (np.median(steps), np.median(gaps_ms))
        margins = [e["margin_ms"] for e in log[len(log) // 2 :]]
        assert -50 <= np.median(margins) <= 200, margins


def test_mjpeg_quality_steps_down_to_fit_a_low_rate(make_server):
    """The sender's tick fits JPEG quality to the rate's per-frame budget: capped at the
    lowest rate, the stream goes to the lowest quality and its frames get smaller."""
    from spicestream.video.mjpeg import QUALITY_STEPS

    server = make_server("spice:mjpeg")
    with TestClient("127.0.0.1", server.port, display_caps=ALL_CODECS) as client:
        client.wait_for(lambda c: c.marked)
        k = play_until_stream(server, client)
        channel = next(iter(server._core.display_channels))
        stream = channel.streams.active

        def quality() -> int:
            return server.stats()["clients"][0]["streams"]["active"]["quality"]

        def cap(rate):
            rate.max_bit_rate = rate.target = rate.min_bit_rate

        start = quality()
        assert start > QUALITY_STEPS[0]
        before = [f["size"] for f in server.frame_timings()[0]]
        server._on_loop(lambda: cap(stream.rate))
        deadline = time.monotonic() + 10
        while quality() != QUALITY_STEPS[0]:
            assert time.monotonic() < deadline, f"quality stayed at {quality()}"
            server.display.update(moving_picture(k), damage=[REGION])
            k += 1
            time.sleep(1 / 30)
        for _ in range(20):  # frames encoded at the lowest quality
            server.display.update(moving_picture(k), damage=[REGION])
            k += 1
            time.sleep(1 / 30)
        after = [f["size"] for f in server.frame_timings()[0]][-10:]
        assert sum(after) / len(after) < 0.7 * sum(before) / len(before), (before, after)
