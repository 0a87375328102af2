"""spice-html5 in headless Chromium, served by spicestream itself (--web) over its own
WebSocket on the SPICE port."""

from __future__ import annotations

import os
import shutil
import time
import urllib.request

import numpy as np
import pytest

import spicestream
from spicestream.server.web import SPICE_HTML5_ROOT, WebError

from helpers import Background

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.realclient,
              pytest.mark.skipif(CHROMIUM is None or not os.path.isdir(SPICE_HTML5_ROOT),
                                 reason="needs Debian's chromium and spice-html5")]
playwright = pytest.importorskip("playwright.sync_api")

W, H = 320, 240
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def picture() -> np.ndarray:
    frame = np.zeros((H, W, 4), np.uint8)
    frame[..., :3] = (40, 160, 30)  # BGR: green
    frame[60:120, 80:200, :3] = (200, 30, 30)  # blue block
    frame[150:220, 20:90, :3] = (20, 20, 230)  # red block
    frame[..., 3] = 255
    return frame


def canvas_shot(page) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    png = page.locator("#spice-screen canvas").first.screenshot()
    shot = np.asarray(Image.open(BytesIO(png)).convert("RGB"))
    border = (shot.shape[0] - H) // 2  # spice.css draws a 1 px border around the canvas
    return shot[border : border + H, border : border + W] if border > 0 else shot


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_page_connects_and_shows_the_picture(browser, scheme, tmp_path):
    from test_security import make_ca_and_cert

    paths = make_ca_and_cert(tmp_path)
    server = spicestream.Server(port=0, width=W, height=H, web=True, streaming_video="off", tls_port=0,
                                tls_cert=str(paths["cert"]), tls_key=str(paths["key"])).start()
    try:
        frame = picture()
        server.display.update(frame)
        # The test CA is not in the browser's store: accept it for this page only.
        page = browser.new_page(viewport={"width": 800, "height": 600}, ignore_https_errors=True)
        port = server.port if scheme == "http" else server.tls_port
        page.goto(f"{scheme}://localhost:{port}/")  # https: the page then connects with wss://
        assert "spice_auto.html" in page.url and f"port={port}" in page.url
        page.wait_for_selector("#spice-screen canvas", timeout=15000)
        deadline = time.monotonic() + 15
        while True:
            shot = canvas_shot(page)
            rgb = frame[..., 2::-1]
            points = [(y, x) for y in range(5, H, 23) for x in range(5, W, 29)]
            ok = shot.shape[:2] == (H, W) and all(
                np.abs(shot[y, x].astype(int) - rgb[y, x].astype(int)).max() <= 8 for y, x in points)
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert ok, "the canvas does not show the application's picture"
        assert server.sessions == 1
        page.close()
    finally:
        server.stop()


class Mover(Background):
    def __init__(self, display):
        super().__init__()
        self.display, self.k = display, 0

    def run(self):
        yy, xx = np.mgrid[0:H, 0:W]
        while not self.stop.is_set():
            frame = picture()
            frame[..., 0] = (128 + 100 * np.sin(xx / 9 + self.k / 3)).astype(np.uint8)  # moving waves
            x = 20 + (self.k * 6) % (W - 80)
            frame[90:150, x : x + 40, :3] = 255  # a white square sliding right
            self.display.update(frame)
            self.k += 1
            self.stop.wait(1 / 30)


@pytest.mark.parametrize("codecs", ["spice:mjpeg", "gstreamer:vp8"])
def test_video_stream_moves_in_the_browser(browser, codecs):
    server = spicestream.Server(port=0, width=W, height=H, web=True, streaming_video="all",
                                video_codecs=codecs).start()
    try:
        with Mover(server.display):
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(f"http://127.0.0.1:{server.port}/")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                clients = server.stats()["clients"]
                active = clients[0]["streams"]["active"] if clients else None
                if active and active["frames_sent"] > 20:
                    break
                time.sleep(0.2)
            assert active and active["codec_entry"] == codecs, server.stats()
            # VP8 plays in a <video> laid over the canvas: screenshot the page where the canvas is.
            page.wait_for_selector("#spice-screen canvas", timeout=15000)
            box = page.locator("#spice-screen canvas").first.bounding_box()

            def whole_page():
                from io import BytesIO

                from PIL import Image

                png = page.screenshot(clip=box)
                return np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)

            first = whole_page()
            time.sleep(0.6)
            second = whole_page()
            changed = np.abs(first - second).max(axis=2) > 40
            assert changed.mean() > 0.05, f"only {changed.mean():.3f} of the picture changed"
            assert server.stats()["clients"][0]["streams"]["failed_codecs"] == []
            page.close()
    finally:
        server.stop()


def test_web_needs_spice_html5_and_plain_gets_without_web_are_refused(tmp_path):
    with pytest.raises(WebError, match="spice-html5"):
        spicestream.Server(port=0, web=str(tmp_path))
    server = spicestream.Server(port=0, width=64, height=64).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)
        assert info.value.code == 404 and b"--web" in info.value.read()
    finally:
        server.stop()



