"""/metrics (Prometheus) during a remote-viewer session: frames sent go up, the stream's codec
is a label, a failed login is counted; the numbers are stats()'s."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest

import spicestream
from spicestream.server.metrics import serve_metrics
from spicestream.testing.client import LinkRefused, TestClient

from helpers import Paced

try:
    from . import xclient
except ImportError:
    import xclient

pytest.importorskip("prometheus_client")
pytestmark = [pytest.mark.realclient, pytest.mark.timeout(90),
              pytest.mark.skipif(bool(xclient.missing_tools()), reason="needs remote-viewer under Xvfb")]
W, H = 320, 240


class Moving(Paced):
    def __init__(self, display):
        self.display = display
        super().__init__(fps=30)

    def draw(self, k):
        frame = np.zeros((H, W, 4), np.uint8)
        frame[..., 3] = 255
        x = (k * 6) % (W - 60)
        frame[80:160, x:x + 60, :3] = (30, 200, 250)
        frame[10:30, :, :3] = np.random.default_rng(k).integers(0, 255, (20, W, 3))
        self.display.update(frame)


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def value(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_during_a_remote_viewer_session(tmp_path):
    server = spicestream.Server(port=0, width=W, height=H, password="s3cret",
                                video_codecs="spice:mjpeg", streaming_video="all").start()
    httpd, _ = serve_metrics(server, "127.0.0.1", 0)
    try:
        with Moving(server.display), xclient.XSession(800, 600, log_dir=tmp_path / "x") as x:
            conn = tmp_path / "conn.vv"
            conn.write_text(f"[virt-viewer]\ntype=spice\nhost=127.0.0.1\nport={server.port}\npassword=s3cret\n")
            x.find_window(x.start_viewer(conn))

            def sent():
                return value(scrape(httpd.server_port), "spicestream_frames_sent_total", codec="mjpeg")
            first = xclient.wait_until(lambda: (sent() or 0) > 10 and sent(), 20, 0.2, "frames sent")
            xclient.wait_until(lambda: (sent() or 0) >= first + 30, 20, 0.2, "frames sent increasing")
            text = scrape(httpd.server_port)
            assert value(text, "spicestream_clients_connected") == 1
            assert re.search(r'spicestream_encode_latency_seconds_bucket\{.*codec="mjpeg".*le="\+Inf"', text)
            # A wrong password: counted, by reason.
            with pytest.raises(LinkRefused):
                TestClient("127.0.0.1", server.port, password="wrong", channels=()).connect()
            after = scrape(httpd.server_port)
            assert value(after, "spicestream_auth_failures_total", reason="wrong password") == 1
            # One source of truth: the counter is stats()'s.
            active = server.stats()["clients"][0]["streams"]["active"]
            assert active["frames_sent"] >= value(after, "spicestream_frames_sent_total", codec="mjpeg")
    finally:
        httpd.shutdown()
        server.stop()
