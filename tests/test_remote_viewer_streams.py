"""Video streams in the real client: remote-viewer under Xvfb plays H.264, VP8, VP9, MJPEG.

The application plays a moving picture in one region (a white square sliding over a coloured
pattern) at 30 fps, with coloured markers in the corners. The server must create a stream
(its stats, and the client's own debug log, show it), and two screenshots taken a moment
apart must show the square in two different places, inside the region, where the
application drew it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

import spicestream

import xclient
from helpers import Background

pytestmark = [pytest.mark.realclient,
              pytest.mark.skipif(bool(xclient.missing_tools()), reason="needs Xvfb, remote-viewer, xdotool, import")]

W, H = 640, 480
REGION = (192, 128, 256, 192)  # x, y, w, h; tile-aligned
SQUARE = 48
MARKERS = {  # corner squares, RGB, used to find the display on the screen
    (0, 0): (255, 0, 0), (W - 64, 0): (0, 255, 0), (0, H - 64): (0, 0, 255), (W - 64, H - 64): (255, 255, 0)}
STEP = 5  # pixels the square moves per frame


def decoder_installed(element: str) -> bool:
    tool = shutil.which("gst-inspect-1.0")
    return tool is not None and subprocess.run([tool, element], capture_output=True).returncode == 0


def base_frame() -> np.ndarray:
    frame = np.zeros((H, W, 4), np.uint8)
    frame[..., :3] = (60, 40, 30)  # BGR: dark blue-grey desktop
    for (x, y), (r, g, b) in MARKERS.items():
        frame[y : y + 64, x : x + 64, :3] = (b, g, r)
    frame[..., 3] = 255
    return frame


def square_x(k: int) -> int:
    span = REGION[2] - SQUARE
    pos = (k * STEP) % (2 * span)
    return REGION[0] + (pos if pos < span else 2 * span - pos)


class Player(Background):
    """Draws the moving picture at 30 fps from a thread, remembering where the square is."""

    def __init__(self, display):
        self.display, self.k = display, 0
        self.base = base_frame()
        x, y, w, h = REGION
        yy, xx = np.mgrid[0:h, 0:w]
        self.pattern = np.zeros((h, w, 3), np.uint8)
        self.pattern[..., 0] = 120 + (xx * 100 // w)
        self.pattern[..., 1] = 60 + (yy * 120 // h)
        self.pattern[..., 2] = 90
        super().__init__()

    def run(self) -> None:
        x, y, w, h = REGION
        while not self.stop.is_set():
            frame = self.base.copy()
            frame[y : y + h, x : x + w, :3] = np.roll(self.pattern, self.k * 3, axis=1)
            sx = square_x(self.k)
            frame[y + 72 : y + 72 + SQUARE, sx : sx + SQUARE, :3] = 255
            self.display.update(frame, damage=[REGION])
            self.k += 1
            time.sleep(1 / 30)


def blob_centre(shot: np.ndarray, rgb, tol: int = 40):
    match = (np.abs(shot.astype(np.int16) - np.array(rgb, np.int16)) <= tol).all(axis=2)
    if match.sum() < 50:
        return None
    ys, xs = np.nonzero(match)
    return float(xs.mean()), float(ys.mean())


def locate(shot: np.ndarray):
    """Map surface coordinates to the screen from the four corner markers."""
    centres = {pos: blob_centre(shot, rgb) for pos, rgb in MARKERS.items()}
    if any(c is None for c in centres.values()):
        return None
    (x0, y0), (x1, _), (_, y1) = centres[(0, 0)], centres[(W - 64, 0)], centres[(0, H - 64)]
    sx, sy = (x1 - x0) / (W - 64), (y1 - y0) / (H - 64)
    ox, oy = x0 - 32 * sx, y0 - 32 * sy
    return lambda x, y: (ox + x * sx, oy + y * sy), (sx, sy, ox, oy)


def square_on_screen(shot, mapping):
    """Surface x of the white square's centre, looking only inside the stream region."""
    to_screen, (sx, sy, ox, oy) = mapping
    x, y, w, h = REGION
    (l, t), (r, b) = to_screen(x, y), to_screen(x + w, y + h)
    area = shot[int(t) + 2 : int(b) - 2, int(l) + 2 : int(r) - 2].astype(np.int16)
    white = (area >= 225).all(axis=2)
    if white.sum() < (SQUARE * sx) * (SQUARE * sy) * 0.5:
        return None
    ys, xs = np.nonzero(white)
    cx = (xs.mean() + int(l) + 2 - ox) / sx
    cy = (ys.mean() + int(t) + 2 - oy) / sy
    return cx, cy


@contextlib.contextmanager
def watched(codecs: str, tmp_path):
    """A server playing the moving picture, and remote-viewer (debug log on) watching it."""
    server = spicestream.Server(port=0, width=W, height=H, video_codecs=codecs, streaming_video="all")
    server.start()
    try:
        with xclient.XSession(1024, 768, log_dir=tmp_path) as x, Player(server.display) as player:
            x.env["SPICE_DEBUG"] = "1"
            x.find_window(x.start_viewer(f"spice://127.0.0.1:{server.port}"))
            yield server, x, player
    finally:
        server.stop()


def active_stream(server, min_frames: int = 0) -> dict | None:
    """The first client's active stream once it has sent more than `min_frames` frames."""
    clients = server.stats()["clients"]
    active = clients[0]["streams"]["active"] if clients else None
    return active if active and active["frames_sent"] > min_frames else None


CASES = [("gstreamer:h264", "avdec_h264"), ("gstreamer:vp8", "vp8dec"), ("gstreamer:vp9", "vp9dec"),
         ("spice:mjpeg", None)]


@pytest.mark.parametrize("codecs,decoder", CASES, ids=[c for c, _ in CASES])
def test_remote_viewer_plays_the_stream(codecs, decoder, tmp_path):
    if decoder and not decoder_installed(decoder):
        pytest.skip(f"the client's GStreamer has no {decoder}")
    with watched(codecs, tmp_path) as (server, x, player):
        xclient.wait_until(lambda: active_stream(server, 30), 20, 0.2, "a stream with frames")
        mapping = xclient.wait_until(lambda: locate(x.screenshot()), 20, 0.3, "the display on screen")
        first = xclient.wait_until(lambda: square_on_screen(x.screenshot(), mapping), 10, 0.1,
                                   "the square in the stream region")
        time.sleep(0.5)
        shot = x.screenshot()
        second = square_on_screen(shot, mapping)
        x.save(shot, tmp_path / "stream.png")
        assert second is not None, "square not visible in the second screenshot"
        rx, ry, rw, rh = REGION
        for cx, cy in (first, second):  # where the application drew it
            assert rx <= cx <= rx + rw and ry + 72 - 6 <= cy <= ry + 72 + SQUARE + 6, (cx, cy)
        assert abs(second[0] - first[0]) > 10, (first, second)  # it moved between screenshots
        stats = server.stats()["clients"][0]["streams"]
        assert stats["failed_codecs"] == [], stats  # the client decoded what it was sent
        assert stats["active"]["codec_entry"] == codecs
        log = (tmp_path / "remote-viewer.log").read_text(errors="replace")
        assert "stream" in log.lower()
        assert player.k > 30


LATE_PATTERNS = ("too late", "dropping")  # spice-gtk's debug lines for late frames (§6.3)


@pytest.mark.parametrize("codecs", ["gstreamer:h264", "spice:mjpeg"])
def test_no_late_frames_over_30_seconds(codecs, tmp_path):
    """30 s of a 30 fps stream on loopback: remote-viewer's debug log shows no frame dropped
    for lateness, and its stream reports reach the server's controller."""
    with watched(codecs, tmp_path) as (server, x, player):
        xclient.wait_until(lambda: active_stream(server), 20, 0.2, "a stream")
        log_path = tmp_path / "remote-viewer.log"
        start_frames = player.k
        time.sleep(30)
        frames = player.k - start_frames
        stats = server.stats()["clients"][0]["streams"]["active"]
        log = log_path.read_text(errors="replace").splitlines()
        late = [line for line in log if any(p in line for p in LATE_PATTERNS)]
        assert frames >= 30 * 30 * 0.9, f"the application drew {frames} frames"
        assert stats["frames_sent"] >= frames * 0.9, stats
        assert not late, f"{len(late)} late frames, e.g. {late[:3]}"
        report = stats["last_report"]
        assert report and report["num_drops"] == 0 and report["last_frame_delay"] >= 0, report


@pytest.mark.parametrize("y0_top", [True, False], ids=["y0-top", "y0-bottom"])
def test_remote_viewer_shows_a_dmabuf_scanout_the_right_way_up(y0_top, tmp_path):
    """A producer renders into a memfd 'scanout' and calls gl_draw; remote-viewer (a remote
    client: it gets video) shows the markers where they belong and the square moving."""
    import mmap
    import os

    from spicestream.display.scanout import fourcc

    stride = W * 4
    fd = os.memfd_create("scanout")
    os.ftruncate(fd, stride * H)
    buffer = mmap.mmap(fd, stride * H)
    pixels = np.frombuffer(buffer, np.uint8).reshape(H, W, 4)
    server = spicestream.Server(port=0, width=W, height=H, video_codecs="gstreamer:h264")
    server.start()
    stop = threading.Event()
    done = []
    server.on_gl_draw_done = done.append

    def produce():
        k = 0
        while not stop.is_set():
            frame = base_frame()
            sx = square_x(k)
            frame[REGION[1] + 72 : REGION[1] + 72 + SQUARE, sx : sx + SQUARE, :3] = 255
            pixels[:] = frame if y0_top else frame[::-1]
            server.display.gl_draw(0, 0, W, H, k)
            k += 1
            stop.wait(1 / 30)

    producer = threading.Thread(target=produce, daemon=True)
    try:
        pixels[:] = base_frame() if y0_top else base_frame()[::-1]
        server.display.gl_scanout(fd, W, H, stride, fourcc("XR24"), y0_top=y0_top)
        producer.start()
        with xclient.XSession(1024, 768, log_dir=tmp_path) as x:
            viewer = x.start_viewer(f"spice://127.0.0.1:{server.port}")
            x.find_window(viewer)
            mapping = xclient.wait_until(lambda: locate(x.screenshot()), 20, 0.3, "the markers on screen")
            _, (sx, sy, _, _) = mapping
            assert sx > 0 and sy > 0, "picture mirrored"  # red top-left, blue bottom-left
            first = xclient.wait_until(lambda: square_on_screen(x.screenshot(), mapping), 10, 0.1, "the square")
            time.sleep(0.5)
            shot = x.screenshot()
            x.save(shot, tmp_path / "scanout.png")
            second = square_on_screen(shot, mapping)
            assert second is not None and abs(second[0] - first[0]) > 10, (first, second)
            assert REGION[1] + 72 - 6 <= second[1] <= REGION[1] + 72 + SQUARE + 6, second
        assert done, "no draw completed"
    finally:
        stop.set()
        if producer.is_alive():
            producer.join(5)  # it writes into the mapping we are about to close
        server.stop()
        server.display.gl_release()
        del pixels
        buffer.close()
        os.close(fd)
