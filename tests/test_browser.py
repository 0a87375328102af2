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

import framecode
from helpers import Paced

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.realclient,
              pytest.mark.skipif(CHROMIUM is None or not os.path.isdir(SPICE_HTML5_ROOT),
                                 reason="needs Debian's chromium and spice-html5")]
playwright = pytest.importorskip("playwright.sync_api")

W, H = 320, 240
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required"]  # sound plays without a click


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


CODE_AT = (20, 20)  # the frame number (tests/framecode.py)
SQUARE_TOP, SQUARE_SIZE = 90, 40


def square_left(k: int) -> int:
    return 20 + (k * 6) % (W - 80)


class Mover(Paced):
    """Moving waves everywhere, a white square sliding right, and the frame number."""

    def __init__(self, display):
        self.display = display
        self.yy, self.xx = np.mgrid[0:H, 0:W]
        super().__init__(30)

    def draw(self, k):
        frame = picture()
        frame[..., 0] = (128 + 100 * np.sin(self.xx / 9 + k / 3)).astype(np.uint8)  # moving waves
        x = square_left(k)
        frame[SQUARE_TOP : SQUARE_TOP + 60, x : x + SQUARE_SIZE, :3] = 255
        framecode.paint(frame, k, *CODE_AT)
        self.display.update(frame)


def square_centre_x(shot: np.ndarray, border: int) -> float | None:
    band = shot[border + SQUARE_TOP + 4 : border + SQUARE_TOP + 56, border : border + W].astype(np.int16)
    white = (band >= 225).all(axis=2)
    if white.sum() < SQUARE_SIZE * 52 * 0.5:
        return None
    return float(np.nonzero(white)[1].mean())


@pytest.mark.parametrize("codecs", ["spice:mjpeg", "gstreamer:vp8"])
def test_video_stream_moves_in_the_browser(browser, codecs):
    """Each page screenshot is judged against the frame number it shows: the square is where
    that frame put it, and the frames shown advance."""
    server = spicestream.Server(port=0, width=W, height=H, web=True, streaming_video="all",
                                video_codecs=codecs).start()
    try:
        with Mover(server.display) as mover:
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
            border = max(0, int(round((box["height"] - H) / 2)))  # spice.css: 1 px around the canvas

            def whole_page():
                from io import BytesIO

                from PIL import Image

                png = page.screenshot(clip=box)
                return np.asarray(Image.open(BytesIO(png)).convert("RGB"))

            seen = []
            deadline = time.monotonic() + 20
            while len(seen) < 10 and time.monotonic() < deadline:
                shot = whole_page()
                drawn = mover.k
                k = framecode.read(shot, lambda x, y: (x + border, y + border), *CODE_AT)
                if k is not None:
                    seen.append((k, square_centre_x(shot, border), drawn))
                time.sleep(0.1)
            print("frame shown, square centre x, frames drawn:", seen)
            assert len(seen) >= 8, f"only {len(seen)} screenshots with a readable frame number"
            consistent = [k for k, cx, drawn in seen
                          if cx is not None and k < drawn and abs(cx - (square_left(k) + SQUARE_SIZE / 2)) <= 4]
            assert len(consistent) >= 0.75 * len(seen), f"square not where frame k put it: {seen}"
            assert len(set(consistent)) >= 4, f"the picture did not advance: frames shown {consistent}"
            assert server.stats()["clients"][0]["streams"]["failed_codecs"] == []
            page.close()
    finally:
        server.stop()


@pytest.mark.parametrize("codecs", ["spice:mjpeg", "gstreamer:vp8"])
def test_bottom_up_scanout_shows_the_right_way_up_in_the_browser(browser, codecs, tmp_path):
    """spice-html5 ignores the stream's top-down flag: a browser's encoder turns a bottom-up
    scanout over itself, and the page shows the picture as the producer meant it."""
    from spicestream.display.scanout import fourcc

    stride = W * 4
    fd = os.memfd_create("scanout")
    frame = picture()  # the blue block is near the top, the red one near the bottom
    os.pwrite(fd, frame[::-1].tobytes(), 0)  # stored bottom row first, as GL renders
    server = spicestream.Server(port=0, width=W, height=H, web=True, video_codecs=codecs).start()
    try:
        server.display.gl_scanout(fd, W, H, stride, fourcc("XR24"), y0_top=False)
        server.display.gl_draw(0, 0, W, H, 0)
        page = browser.new_page(viewport={"width": 800, "height": 600})
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("#spice-screen canvas", timeout=15000)
        box = page.locator("#spice-screen canvas").first.bounding_box()
        border = max(0, int(round((box["height"] - H) / 2)))

        def shows_the_picture():
            from io import BytesIO

            from PIL import Image

            # VP8 plays in a <video> laid over the canvas: screenshot the page there.
            shot = np.asarray(Image.open(BytesIO(page.screenshot(clip=box))).convert("RGB"))
            shot = shot[border : border + H, border : border + W]
            rgb = frame[..., 2::-1].astype(int)
            points = [(y, x) for y in range(8, H, 23) for x in range(8, W, 29)]
            # JPEG/VP8 are lossy: judged on the share of points close to the picture.
            close = sum(np.abs(shot[y, x].astype(int) - rgb[y, x]).max() <= 40 for y, x in points)
            return shot.shape[:2] == (H, W) and close >= 0.9 * len(points)

        deadline = time.monotonic() + 20
        while not shows_the_picture():
            if time.monotonic() > deadline:
                page.screenshot(path=str(tmp_path / "page.png"))
                raise AssertionError(f"the page never showed the scanout the right way up: {server.stats()}")
            server.display.gl_draw(0, 0, W, H, 0)  # a producer that keeps drawing the same picture
            time.sleep(0.3)
        stream = server.stats()["clients"][0]["streams"]["active"]
        assert stream is not None and stream["codec_entry"] == codecs
        page.close()
    finally:
        server.stop()
        server.display.gl_release()
        os.close(fd)


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





# Counts what spice-html5 hands to Media Source Extensions (its Opus packets, in WebM).
AUDIO_PROBE = """
window.__audio = {appended: 0};
const append = SourceBuffer.prototype.appendBuffer;
SourceBuffer.prototype.appendBuffer = function (data) {
    window.__audio.appended += data.byteLength;
    return append.call(this, data);
};
"""


def sound_page(browser, server, probe: str, wait_for_channel: bool = True):
    """spice-html5 on `server`'s picture with `probe` run first in the page; skips where this
    Chromium cannot play Opus in WebM. Returns (page, its playback channel or None)."""
    server.display.update(picture())
    page = browser.new_page(viewport={"width": 800, "height": 600})
    page.add_init_script(probe)
    page.goto(f"http://localhost:{server.port}/")
    page.wait_for_selector("#spice-screen canvas", timeout=15000)
    if not page.evaluate("MediaSource.isTypeSupported('audio/webm; codecs=\"opus\"')"):
        pytest.skip("this Chromium cannot play Opus in WebM (spice-html5 then opens no sound)")
    if not wait_for_channel:
        return page, None
    deadline = time.monotonic() + 15
    while not server._core.audio.channels and time.monotonic() < deadline:
        time.sleep(0.05)  # sound goes to a playback channel that is there to start its stream
    assert server._core.audio.channels, "spice-html5 opened no playback channel"
    return page, next(iter(server._core.audio.channels))


def test_the_browser_plays_opus_sound(browser):
    import threading

    server = spicestream.Server(port=0, width=W, height=H, web=True, streaming_video="off").start()
    stop = threading.Event()

    def tone():  # 440 Hz, 10 ms pieces paced by deadline
        start, n = time.monotonic(), 0
        while not stop.is_set():
            server.audio.write((np.sin(2 * np.pi * 440 * np.arange(n, n + 480) / 48000) * 0.3).astype(np.float32))
            n += 480
            stop.wait(max(0.0, start + n / 48000 - time.monotonic()))

    player = threading.Thread(target=tone, daemon=True)
    try:
        page, _ = sound_page(browser, server, AUDIO_PROBE, wait_for_channel=False)
        player.start()
        deadline = time.monotonic() + 20
        state = {}
        while time.monotonic() < deadline:
            # spice-html5 puts an autoplaying <audio> into the screen's div (playback.js).
            state = page.evaluate("({appended: window.__audio.appended, played: Array.from("
                                  "document.querySelectorAll('#spice-screen audio')).map(e => e.currentTime)})")
            if state["appended"] > 2000 and any(t > 1.0 for t in state["played"]):
                break
            time.sleep(0.25)
        assert state.get("appended", 0) > 2000, state  # Opus packets reached Media Source
        assert any(t > 1.0 for t in state.get("played", [])), state  # and over a second played
        channels = [c.stats() for c in server._core.audio.channels]
        assert channels and all(c["mode"] == "opus" and c["sent"] > 50 for c in channels), channels
        page.close()
    finally:
        stop.set()
        server.stop()


def test_the_browser_plays_a_short_beep_that_starts_a_stream_to_its_end(browser):
    """A 300 ms beep after silence starts a stream: spice-html5 gets it at once, and the
    silence after it makes Chromium's player, which holds back the end of what it has, play it
    through: the page's audio element passes the beep's end."""
    server = spicestream.Server(port=0, width=W, height=H, web=True, streaming_video="off").start()
    beep_s = 0.3
    try:
        page, _ = sound_page(browser, server, AUDIO_PROBE)
        deadline = time.monotonic() + 15
        n = int(beep_s * 48000)
        server.audio.write((np.sin(2 * np.pi * 440 * np.arange(n) / 48000) * 0.3).astype(np.float32))
        played, state = 0.0, {}
        while time.monotonic() < deadline and played < beep_s:
            state = page.evaluate("({appended: window.__audio.appended, played: Array.from("
                                  "document.querySelectorAll('#spice-screen audio')).map(e => e.currentTime)})")
            played = max([played, *state["played"]])
            time.sleep(0.05)
        assert state.get("appended", 0) > 0, state
        assert played >= beep_s, (played, state)  # to its end: the player did not hold it back
        channels = [c.stats() for c in server._core.audio.channels]
        assert [(c["sent"] >= beep_s * 100, c["settling"], c["filled"] > 0) for c in channels] == [(True, 0, True)]
        page.close()
    finally:
        server.stop()


# What spice-html5's audio element holds ahead of what it plays, sampled every 100 ms.
AHEAD_PROBE = """
window.__ahead = [];
setInterval(() => {
    const e = document.querySelector('#spice-screen audio');
    if (e && e.buffered.length && e.currentTime > 0)
        window.__ahead.push([e.currentTime, e.buffered.end(e.buffered.length - 1)]);
}, 100);
"""


def test_the_browser_holds_less_sound_ahead_once_quiet_packets_are_left_out(browser):
    """Chromium starts spice-html5's sound with ~350 ms buffered and keeps that much; the
    server leaves out BROWSER_DRAIN_MS of quiet packets once it plays, and the player, which
    times packets 10 ms apart whatever their stamps, then holds that much less ahead."""
    import threading

    from spicestream.audio.output import DRAIN_OPENS_MS
    from spicestream.server.audio import BROWSER_DRAIN_MS

    server = spicestream.Server(port=0, width=W, height=H, web=True, streaming_video="off").start()
    stop = threading.Event()

    def tone():  # 440 Hz with 200 ms of silence each second, 10 ms pieces paced by deadline
        start, n = time.monotonic(), 0
        while not stop.is_set():
            level = 0.0 if (n // 480) % 100 >= 80 else 0.3
            server.audio.write((np.sin(2 * np.pi * 440 * np.arange(n, n + 480) / 48000) * level).astype(np.float32))
            n += 480
            stop.wait(max(0.0, start + n / 48000 - time.monotonic()))

    player = threading.Thread(target=tone, daemon=True)
    try:
        page, channel = sound_page(browser, server, AHEAD_PROBE)
        deadline = time.monotonic() + 15
        player.start()
        drained_at = None
        while time.monotonic() < deadline:
            if drained_at is None and channel.drained == BROWSER_DRAIN_MS // 10:
                drained_at = time.monotonic()
            if drained_at is not None and time.monotonic() - drained_at > 3:
                break
            time.sleep(0.1)
        assert channel.drained == BROWSER_DRAIN_MS // 10 and channel.settling == 0, channel.stats()
        samples = page.evaluate("window.__ahead")
        # Before the drain opens (media time, while the player has played less than that) and
        # over the last 2 s: what the player held ahead of its position, in ms.
        before = [1000 * (end - t) for t, end in samples if 0.2 < t < DRAIN_OPENS_MS / 1000 - 0.5]
        after = [1000 * (end - t) for t, end in samples[-20:]]
        assert len(before) >= 3 and len(after) == 20, samples
        assert np.median(before) - np.median(after) >= BROWSER_DRAIN_MS * 0.3, (before, after)
        page.close()
    finally:
        stop.set()
        server.stop()
