"""Many clients, one encode: sharing, late joiners, slow clients, limits, per-client input."""

from __future__ import annotations

import time

import numpy as np
import pytest

from helpers import Paced

import spicestream
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.constants import DisplayCap, LinkError
from spicestream.protocol.messages import CLIENT
from spicestream.testing.client import LinkRefused, TestClient

pytest.importorskip("gi")

W, H = 640, 480
CAPS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
        DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_H264, DisplayCap.CODEC_VP8)


class Player(Paced):
    def __init__(self, display, fps=30):
        self.display = display
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (H // 16, W // 16, 4), dtype=np.uint8)
        self.texture = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)
        super().__init__(fps)

    def draw(self, k):
        self.display.update(np.roll(self.texture, k * 8, axis=1), [(0, 0, W, H)])


@pytest.fixture
def server():
    srv = spicestream.Server(port=0, width=W, height=H, video_codecs="gstreamer:h264;gstreamer:vp8",
                             streaming_video="all").start()
    yield srv
    srv.stop()


def hubs(server):
    return list(server._core.encoders.hubs.values())


def streaming_clients(server, count: int, frames: int) -> list:
    """`count` clients connected, each once it has more than `frames` stream frames (all
    closed if one does not get there)."""
    clients = []
    try:
        for _ in range(count):
            clients.append(TestClient("127.0.0.1", server.port, display_caps=CAPS,
                                      decode_streams=False).connect())
        for c in clients:
            c.wait_for(lambda c: len(c.stream_log) > frames, timeout=20, what="stream frames")
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def test_clients_on_the_same_codec_share_one_encoder(server):
    with Player(server.display):
        clients = streaming_clients(server, 4, 20)
        try:
            assert len(hubs(server)) == 1
            hub = hubs(server)[0]
            assert len(hub.subscribers) == 4
            streams = [c["streams"]["active"] for c in server.stats()["clients"]]
            assert all(s["shared_by"] == 4 for s in streams)
            # One encode per frame, not four.
            assert hub.frames_encoded <= max(s["frames_sent"] for s in streams) + 5
            # A client that needs another codec gets its own encoder.
            vp8_only = (DisplayCap.MONITORS_CONFIG, DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG,
                        DisplayCap.CODEC_VP8)
            other = TestClient("127.0.0.1", server.port, display_caps=vp8_only, decode_streams=False).connect()
            other.wait_for(lambda c: len(c.stream_log) > 5, timeout=20, what="VP8 frames")
            assert len(hubs(server)) == 2
            other.close()
            clients.pop().close()
            deadline = time.monotonic() + 5
            while len(hubs(server)[0].subscribers) != 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(hubs(server)) == 1 and len(hubs(server)[0].subscribers) == 3
        finally:
            for c in clients:
                c.close()


def test_late_joiner_decodes_its_first_frame_at_once(server):
    with Player(server.display):
        first = TestClient("127.0.0.1", server.port, display_caps=CAPS, decode_streams=False).connect()
        try:
            first.wait_for(lambda c: len(c.stream_log) > 30, timeout=20, what="a running stream")
            waits = []
            for _ in range(3):
                with TestClient("127.0.0.1", server.port, display_caps=CAPS) as late:
                    late.wait_for(lambda c: c.stream_log, timeout=5, what="the first frame")
                    entry = late.stream_log[0]
                    assert entry["picture"] is not None, "the first frame did not decode"
                    waits.append(entry["arrival"] - late.display_init_sent)
                    late.wait_for(lambda c: len(c.stream_log) > 10, timeout=5)
                    assert all(e["picture"] is not None for e in late.stream_log[:10])
            # A key frame of the current picture, at once: the first frame decodes (above). How
            # soon is a speed target (bench/first_frame.py, "running": p50 ~10 ms
            # here); this bound only says "at once, not at the next key interval" with margin.
            assert float(np.median(waits)) < 0.5, waits
            assert len(hubs(server)) == 1  # the joiners used the running encoder
        finally:
            first.close()


def test_a_stalled_client_gets_its_own_encoder_and_others_keep_full_rate(server):
    with Player(server.display) as player:
        healthy = TestClient("127.0.0.1", server.port, display_caps=CAPS, decode_streams=False,
                             log_limit=100_000).connect()
        slow = TestClient("127.0.0.1", server.port, display_caps=CAPS, decode_streams=False).connect()
        try:
            for c in (healthy, slow):
                c.wait_for(lambda c: len(c.stream_log) > 10, timeout=20)
            slow.stall()
            n0, k0 = len(healthy.stream_log), player.k
            time.sleep(6)
            received, produced = len(healthy.stream_log) - n0, player.k - k0
            # Of what the application drew in the same window, not of a nominal rate.
            assert received >= 0.85 * produced, (received, produced)
            # The stalled client was moved to an encoder of its own, so the healthy one stops
            # paying for its key frames.
            assert len(hubs(server)) == 2, [len(h.subscribers) for h in hubs(server)]
            slow.resume()
            slow.wait_for(lambda c: len(c.stream_log) > 20, timeout=10)
        finally:
            healthy.close()
            slow.close()


def test_max_clients_refuses_the_next_one():
    srv = spicestream.Server(port=0, width=64, height=64, max_clients=2).start()
    try:
        a = TestClient("127.0.0.1", srv.port).connect()
        b = TestClient("127.0.0.1", srv.port).connect()
        with pytest.raises(LinkRefused) as info:
            TestClient("127.0.0.1", srv.port).connect()
        assert info.value.error == LinkError.ERROR
        a.close()
        deadline = time.monotonic() + 5
        while srv.sessions > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        TestClient("127.0.0.1", srv.port).connect().close()  # room again
        b.close()
    finally:
        srv.stop()


def test_clients_sharing_a_ticket_share_the_display_and_leave_independently():
    srv = spicestream.Server(port=0, width=64, height=64, password="team").start()
    try:
        keys = []
        srv.on_key = lambda code, pressed: keys.append((code, pressed))
        a = TestClient("127.0.0.1", srv.port, password="team").connect()
        b = TestClient("127.0.0.1", srv.port, password="team").connect()
        frame = np.full((64, 64, 4), 200, np.uint8)
        srv.display.update(frame)
        for c in (a, b):
            c.wait_for(lambda c: c.frame is not None and (c.frame[..., :3] == 200).all())
        # One client made view-only: its keys are ignored, the other's arrive.
        srv.set_client_input(a.session_id, False)
        a.key(0x10)
        b.key(0x11)
        b.wait_for(lambda c: (0x11, False) in keys)
        assert (0x10, True) not in keys
        for i in range(8):  # its pointer moves are still acknowledged
            a.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_POSITION(i, i, 0, 0))
        a.wait_for(lambda c: c.motion_acks == 2)
        a.close()
        frame = np.full((64, 64, 4), 90, np.uint8)
        srv.display.update(frame)
        b.wait_for(lambda c: (c.frame[..., :3] == 90).all())
        b.close()
    finally:
        srv.stop()


def test_clients_sharing_an_inline_mjpeg_encoder_all_get_its_frames(monkeypatch):
    """The built-in MJPEG encodes small frames on the server's loop: the client whose offer
    made the frame sends it when the offer is done, the others on the loop's next turn."""
    from spicestream.video import mjpeg

    if mjpeg.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    monkeypatch.setattr(mjpeg, "INLINE_MAX_S", 10.0)  # inline whatever this machine's load
    srv = spicestream.Server(port=0, width=W, height=H, video_codecs="spice:mjpeg",
                             streaming_video="all").start()
    try:
        with Player(srv.display):
            clients = streaming_clients(srv, 3, 30)
            try:
                assert len(hubs(srv)) == 1 and len(hubs(srv)[0].subscribers) == 3
                streams = [c["streams"]["active"] for c in srv.stats()["clients"]]
                assert all(s["shared_by"] == 3 for s in streams), streams
                assert streams[0]["inline_frames"] > 20, streams[0]
            finally:
                for c in clients:
                    c.close()
    finally:
        srv.stop()
