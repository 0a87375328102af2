"""Rate control and latency: a shaped link, a stalled client, and the controller alone."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import Background

import spicestream
from spicestream.protocol.constants import DisplayCap
from spicestream.testing.client import TestClient
from spicestream.video.ratecontrol import USED_SHARE, RateController

import netns

pytest.importorskip("gi")

CAPS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
        DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_H264)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class MovingContent(Background):
    """Full-screen moving content at a steady rate: a textured picture scrolling sideways,
    with a band of fresh noise every frame so the encoder always has more to send than a
    5 Mbit/s link carries."""

    def __init__(self, display, width, height, fps=30):
        self.display, self.fps = display, fps
        rng = np.random.default_rng(1)
        small = rng.integers(0, 256, (height // 8, width // 8, 4), dtype=np.uint8)
        self.texture = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)
        self.texture[..., 3] = 255
        self.frames = 0
        super().__init__()

    def run(self):
        period, next_at = 1 / self.fps, time.monotonic()
        rng = np.random.default_rng(2)
        h, w = self.texture.shape[:2]
        while not self.stop.is_set():
            frame = np.roll(self.texture, self.frames * 8, axis=1)
            noise = rng.integers(0, 256, (-(-h // 8), w // 4, 4), dtype=np.uint8)
            frame[: h // 2] = np.repeat(np.repeat(noise, 4, axis=0), 4, axis=1)[: h // 2]
            self.display.update(frame)
            self.frames += 1
            next_at += period
            self.stop.wait(max(0.0, next_at - time.monotonic()))


def active_stream(server):
    clients = server.stats()["clients"]
    return clients[0]["streams"]["active"] if clients and clients[0].get("streams") else None


# -- the controller alone ------------------------------------------------------------------------
def test_controller_cuts_to_the_delivered_rate_then_climbs():
    rc = RateController(8_000_000, 30, now=0.0)
    acked, t = 0, 0.0
    # A 5 Mbit/s link with a queue building: RTT 80 ms above its minimum.
    for _ in range(30):
        t += 0.1
        acked += 5_000_000 // 8 // 10
        rc.on_sample(t, queue_bytes=50_000, bytes_acked=acked, rtt_ms=100, min_rtt_ms=20)
    assert rc.target < 5_000_000
    assert 4_000_000 < rc.bandwidth < 6_000_000
    low = rc.target
    for _ in range(60):  # the queue is gone: increase gently, as long as the encoder uses it
        t += 0.1
        acked += rc.target // 8 // 10
        rc.on_sent(t, rc.target // 8 // 10)
        rc.on_sample(t, queue_bytes=0, bytes_acked=acked, rtt_ms=21, min_rtt_ms=20)
    assert low < rc.target < low * 2.5
    assert rc.admit(t) is None
    before = None
    for i in range(30):  # easy content: the encoder uses a tenth of its target; no raise
        t += 0.1
        rc.on_sent(t, rc.target // 80 // 10)
        rc.on_sample(t, queue_bytes=0, bytes_acked=acked, rtt_ms=21, min_rtt_ms=20)
        if i == 12:  # once the last second holds only easy frames
            before = rc.target
    assert rc.target == before


def test_controller_skips_frames_while_congested():
    rc = RateController(4_000_000, 30, now=0.0)
    rc.on_sample(0.1, queue_bytes=200_000)  # 0.4 s of data waiting at 4 Mbit/s
    assert rc.admit(0.1) == "congested"
    assert rc.admit(0.7) is None  # but never more than half a second without a frame


def test_a_quarter_of_frames_far_late_cuts_the_rate():
    rc = RateController(4_000_000, 30, now=0.0)
    # A few ms late: a busy client's jitter around a lead of a few ms, not the link.
    assert not rc.on_report(1.0, num_frames=5, num_drops=5, last_frame_delay_ms=-8)
    assert not rc.on_report(2.0, num_frames=5, num_drops=1, last_frame_delay_ms=-300)
    assert rc.target == 4_000_000
    assert rc.on_report(3.0, num_frames=5, num_drops=2, last_frame_delay_ms=-80)
    assert rc.target < 4_000_000


# -- a stalled client ----------------------------------------------------------------------------
def test_stalled_client_does_not_slow_others_and_resumes_with_a_key_frame():
    server = spicestream.Server(port=0, width=640, height=480, video_codecs="gstreamer:h264",
                                streaming_video="all").start()
    try:
        with MovingContent(server.display, 640, 480) as content:
            healthy = TestClient("127.0.0.1", server.port, display_caps=CAPS, decode_streams=False,
                                 log_limit=100_000).connect()
            stalled = TestClient("127.0.0.1", server.port, display_caps=CAPS, decode_streams=True,
                                 log_limit=100_000).connect()
            for c in (healthy, stalled):
                c.wait_for(lambda c: len(c.stream_log) > 10, timeout=15, what="stream frames")
            time.sleep(1)
            stalled.stall()
            rss_start, t0 = rss_bytes(), time.monotonic()
            frames0, produced0 = len(healthy.stream_log), content.frames
            peak = rss_start
            while time.monotonic() - t0 < 10:
                time.sleep(0.5)
                peak = max(peak, rss_bytes())
            received = len(healthy.stream_log) - frames0
            produced = content.frames - produced0
            # Of what the application drew in the same window, not of a nominal rate.
            assert received >= 0.9 * produced, f"healthy client got {received} frames of {produced} drawn"
            assert peak - rss_start < 40 << 20, f"memory grew by {(peak - rss_start) >> 20} MiB"
            stalled_frames = len(stalled.stream_log)
            stalled.resume()
            stalled.wait_for(lambda c: len(c.stream_log) > stalled_frames + 15, timeout=15,
                             what="frames after the stall")
            # Frames after the stall decode (the decoder got a key frame to restart from) and the
            # server forced one.
            after = stalled.stream_log[stalled_frames:]
            assert all(e["picture"] is not None for e in after[5:]), "undecodable frames after the stall"
            info = [c for c in server.stats()["clients"]]
            assert any(c["streams"]["active"]["key_frames"] >= 2 for c in info)
            skipped = [c["streams"]["active"]["dropped"] for c in info]
            assert any(d.get("socket full", 0) > 100 for d in skipped), skipped
            healthy.close()
            stalled.close()
    finally:
        server.stop()


# -- a shaped link -----------------------------------------------------------------------------
LIMIT = 4_000_000  # bit/s; the stream starts at ~6.2 Mbit/s (1080p30), well above it


@pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))
def test_shaped_link_converges_keeps_latency_and_memory_flat_and_recovers():
    """1080p moving content over a 4 Mbit/s link (server -> client, in a network namespace).

    Judged on what happened: the controller must actually have been cut by the link (else the
    encoder never filled it and nothing here is proven: the test fails saying so), the
    target's median over a minute on the limited link sits at the link's rate (the saw-tooth
    of one sample is never judged), frames arrive soon after capture (by the stamps the server
    recorded), memory is flat, and the rate climbs once the limit is lifted."""
    with netns.NetnsLink() as link:
        shaping = link.shape(f"{LIMIT // 1000}kbit")
        server = spicestream.Server(host=link.server_ip, port=0, width=1920, height=1080,
                                    allow_unauthenticated_remote=True,  # a link of the test's own
                                    video_codecs="gstreamer:h264", streaming_video="all").start()
        try:
            with MovingContent(server.display, 1920, 1080) as content:
                watcher = link.popen([sys.executable, "-m", "spicestream.testing.watch", "--host",
                                      link.server_ip, "--port", str(server.port), "--seconds", "150"],
                                     stdout=subprocess.PIPE, text=True)
                lines: list[dict] = []
                reader = threading.Thread(target=lambda: [lines.append(json.loads(l)) for l in watcher.stdout],
                                          daemon=True)
                reader.start()
                deadline = time.monotonic() + 20
                while active_stream(server) is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                start = active_stream(server)
                assert start is not None, "no stream"
                time.sleep(5)  # converging: not judged
                t_converged, frames_converged = time.monotonic(), content.frames
                decreases_converged = active_stream(server)["decreases"]
                # 60 s on the limited link: memory flat, latency low.
                rss, recent, limited_rates, sent_rates = [], {}, [], []
                while time.monotonic() - t_converged < 60:
                    time.sleep(1)
                    rss.append(rss_bytes())
                    recent.update({e["stamp"]: e for e in server.frame_timings()[0]})
                    now_stream = active_stream(server)
                    limited_rates.append(now_stream["bit_rate"])
                    sent_rates.append(now_stream["sent_rate"])
                limited = active_stream(server)
                produced = content.frames - frames_converged
                limited_rate, sent_rate = float(np.median(limited_rates)), float(np.median(sent_rates))
                link.shape(None)  # lift the limit
                climbed = False
                # The target rises only while the encoder uses USED_SHARE of it, so on the
                # limited link it cannot pass LIMIT / USED_SHARE for long: past that, the
                # encoder is sending more than the old link carried. The probe above a known
                # link is gentle (~3 % per 0.5 s); a loaded run saw a cut or two on the way.
                climb_mark = LIMIT / USED_SHARE * 1.05
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and not climbed:
                    time.sleep(0.5)
                    current = active_stream(server)
                    assert current is not None, "the stream ended while the link was opened up"
                    climbed_to = current["bit_rate"]
                    climbed = climbed_to > climb_mark
                watcher.kill()
                reader.join(5)
        finally:
            server.stop()
    frames = [l for l in lines if "stamp" in l]
    delays = [l["arrival"] - recent[l["stamp"]]["capture"] for l in frames
              if l["stamp"] in recent and l["arrival"] > t_converged]
    p95 = float(np.percentile(delays, 95)) if delays else float("nan")
    growth = (max(rss[5:]) - rss[5]) >> 20
    print(json.dumps({"shaping": shaping, "start_bit_rate": start["bit_rate"], "limited_median": limited_rate, "sent_median": sent_rate,
                      "limited_min": min(limited_rates), "limited_max": max(limited_rates),
                      "produced_while_limited": produced, "frames_matched": len(delays),
                      "delay_p95_ms": p95 * 1000, "delay_p50_ms": float(np.median(delays)) * 1000 if delays else None,
                      "rss_growth_mib": growth, "cuts_while_limited": limited["decreases"] - decreases_converged, "climbed_to": climbed_to,
                      "limited": {k: limited[k] for k in ("bit_rate", "bandwidth_estimate", "dropped", "lead_ms",
                                                          "frames_sent", "decreases")}}))
    # The variant that ran: the link was the limit only if the controller had to cut.
    cuts = limited["decreases"] - decreases_converged
    assert cuts >= 1, f"{shaping}: the encoder never filled the link; nothing was proven"
    # What went on the wire sits at the link: the encoder used it and the queue stayed short
    # (below). Measured: sent medians 0.82-0.92x the link (one core busy: 0.83x). The target is
    # the encoder's budget, of which x264 spends 64-80 % here: its median sits at 0.97-1.05x
    # the link, never above LIMIT / USED_SHARE by design.
    assert 0.5 * LIMIT < sent_rate < 1.15 * LIMIT, f"{shaping}: median sent rate {sent_rate:.0f} bit/s"
    assert 0.5 * LIMIT < limited_rate < LIMIT / USED_SHARE, f"{shaping}: median target {limited_rate:.0f} bit/s"
    assert len(delays) > 0.25 * produced, f"only {len(delays)} of {produced} frames matched after convergence"
    assert p95 < 0.250, f"{shaping}: capture-to-arrival p95 {p95 * 1000:.0f} ms"
    assert growth < 30, f"server memory grew {growth} MiB over 60 s"
    assert climbed, f"bit rate did not climb past {climb_mark:.0f} after the limit was lifted"


def test_tcp_info_reads_what_the_kernel_counts():
    """The fields come out of one unpack at their offsets in struct tcp_info: what a loopback
    peer acknowledged is the bytes written; a unix socket has no TCP_INFO."""
    import socket
    import time

    from spicestream.server import tcpinfo

    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as sender:
        receiver, _ = listener.accept()
        with receiver:
            assert tcpinfo.is_tcp(sender)
            sender.sendall(b"x" * 50_000)
            received = 0
            while received < 50_000:
                received += len(receiver.recv(65536))
            # Linux counts the SYN as one byte acknowledged.
            deadline = time.monotonic() + 10
            while (info := tcpinfo.read(sender)).bytes_acked < 50_001 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert info.bytes_acked == 50_001
            assert info.notsent_bytes == 0 and info.unacked_segments == 0
            assert 0 < info.min_rtt_us <= info.rtt_us < 1_000_000
            assert tcpinfo.read(sender, tcp=True).bytes_acked == 50_001
    a, b = socket.socketpair()
    with a, b:
        assert not tcpinfo.is_tcp(a) and tcpinfo.read(a) is None
