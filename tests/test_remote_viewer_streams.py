"""Video streams in the real client: remote-viewer under Xvfb plays H.264, VP8, VP9, MJPEG.

The application plays a moving picture in one region (a white square sliding over a coloured
pattern) at 30 fps, with coloured markers in the corners and the frame number painted as a
code (tests/framecode.py) at the top of the region. The server must create a stream (its
stats, and the client's own debug log, show it). Every screenshot is judged against the frame
it shows: the square must be where the application drew it in *that* frame, and the frames
shown must advance. Nothing depends on how far the square travels between two screenshots.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import shutil
import subprocess
import threading
import time
from typing import Callable

import numpy as np
import pytest

import spicestream

import framecode
import xclient
from helpers import Paced

pytestmark = [pytest.mark.realclient,
              pytest.mark.skipif(bool(xclient.missing_tools()), reason="needs Xvfb, remote-viewer, xdotool, import")]

W, H = 640, 480
REGION = (192, 128, 256, 192)  # x, y, w, h; tile-aligned
SQUARE = 48
MARKERS = {  # corner squares, RGB, used to find the display on the screen
    (0, 0): (255, 0, 0), (W - 64, 0): (0, 255, 0), (0, H - 64): (0, 0, 255), (W - 64, H - 64): (255, 255, 0)}
STEP = 5  # pixels the square moves per frame
CODE_AT = (REGION[0], REGION[1] + 16)  # the frame number, inside the stream region
SQUARE_Y = REGION[1] + 72


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


class Player(Paced):
    """Draws the moving picture at 30 fps (by deadline) from a thread; `k` counts frames drawn."""

    def __init__(self, display):
        self.display = display
        self.base = base_frame()
        x, y, w, h = REGION
        yy, xx = np.mgrid[0:h, 0:w]
        self.pattern = np.zeros((h, w, 3), np.uint8)
        self.pattern[..., 0] = 120 + (xx * 100 // w)
        self.pattern[..., 1] = 60 + (yy * 120 // h)
        self.pattern[..., 2] = 90
        super().__init__(30)

    def draw(self, k: int) -> None:
        x, y, w, h = REGION
        frame = self.base.copy()
        frame[y : y + h, x : x + w, :3] = np.roll(self.pattern, k * 3, axis=1)
        paint_square_and_code(frame, k)
        self.display.update(frame, damage=[REGION])


def paint_square_and_code(frame: np.ndarray, k: int) -> None:
    sx = square_x(k)
    frame[SQUARE_Y : SQUARE_Y + SQUARE, sx : sx + SQUARE, :3] = 255
    framecode.paint(frame, k, *CODE_AT)


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
    """Surface (x, y) of the white square's centre, looking only inside the stream region's
    band where the square runs."""
    to_screen, (sx, sy, ox, oy) = mapping
    x, y, w, h = REGION
    (l, t), (r, b) = to_screen(x, SQUARE_Y - 8), to_screen(x + w, SQUARE_Y + SQUARE + 8)
    area = shot[int(t) + 2 : int(b) - 2, int(l) + 2 : int(r) - 2].astype(np.int16)
    white = (area >= 225).all(axis=2)
    if white.sum() < (SQUARE * sx) * (SQUARE * sy) * 0.5:
        return None
    ys, xs = np.nonzero(white)
    cx = (xs.mean() + int(l) + 2 - ox) / sx
    cy = (ys.mean() + int(t) + 2 - oy) / sy
    return float(cx), float(cy)


def observe(x, mapping, produced: Callable[[], int], samples: int = 12, timeout: float = 20):
    """Screenshots until `samples` of them show a readable frame number. Each sample is
    (frame number shown, square centre found or None, frames the producer had drawn)."""
    seen = []
    deadline = time.monotonic() + timeout
    while len(seen) < samples and time.monotonic() < deadline:
        shot = x.screenshot()
        drawn = produced()
        k = framecode.read(shot, mapping[0], *CODE_AT)
        if k is not None:
            seen.append((k, square_on_screen(shot, mapping), drawn))
        time.sleep(0.1)
    return seen, shot


def judge_motion(seen) -> None:
    """Every readable screenshot shows the square where the application drew it in the frame
    it shows; the shown frames advance over the screenshots, and were really produced."""
    print("frame shown, square centre, frames drawn:", seen)
    assert len(seen) >= 8, f"only {len(seen)} screenshots with a readable frame number"
    consistent = [(k, c) for k, c, drawn in seen
                  if c is not None and k < drawn
                  and abs(c[0] - (square_x(k) + SQUARE / 2)) <= 6
                  and abs(c[1] - (SQUARE_Y + SQUARE / 2)) <= 6]
    # A screenshot can catch the client between two blits; judge the share, not every one.
    assert len(consistent) >= 0.75 * len(seen), f"square not where frame k put it: {seen}"
    frames = [k for k, _ in consistent]
    assert len(set(frames)) >= 4, f"the picture did not advance: frames shown {frames}"
    ordered = sum(b >= a for a, b in zip(frames, frames[1:]))
    assert ordered >= 0.9 * (len(frames) - 1), f"frames shown out of order: {frames}"


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
        seen, shot = observe(x, mapping, lambda: player.k)
        x.save(shot, tmp_path / "stream.png")
        judge_motion(seen)
        stats = server.stats()["clients"][0]["streams"]
        assert stats["failed_codecs"] == [], stats  # the client decoded what it was sent
        assert stats["active"]["codec_entry"] == codecs
        log = (tmp_path / "remote-viewer.log").read_text(errors="replace")
        assert "stream" in log.lower()


LATE_PATTERNS = ("too late", "dropping")  # spice-gtk's debug lines for late frames (§6.3)


@pytest.mark.parametrize("codecs", ["gstreamer:h264", "spice:mjpeg"])
def test_no_late_frames_over_30_seconds(codecs, tmp_path):
    """30 s of a 30 fps stream on loopback: remote-viewer's debug log shows (almost) no frame
    dropped for lateness in that window, and its stream reports reach the server's controller.

    Judged as a share of the frames drawn, in the window only. Measured here: none late on an
    idle machine; 1 of 900 with one core kept busy; 6 of 900 (0.7 %) while a whole second test
    suite ran beside it. A stamping fault makes most frames late; the bound, 3 %, keeps 4x
    margin over the worst load seen. Issue 12 is about driving this to nothing."""
    with watched(codecs, tmp_path) as (server, x, player):
        xclient.wait_until(lambda: active_stream(server), 20, 0.2, "a stream")
        log_path = tmp_path / "remote-viewer.log"
        window_start = seconds_of_day(datetime.datetime.now())  # remote-viewer stamps local time
        start_frames, start_sent = player.k, active_stream(server)["frames_sent"]
        time.sleep(30)
        frames = player.k - start_frames
        stats = server.stats()["clients"][0]["streams"]["active"]
        log = log_path.read_text(errors="replace").splitlines()
        late = [line for line in log if any(p in line for p in LATE_PATTERNS) and in_window(line, window_start)]
        sent = stats["frames_sent"] - start_sent
        print(f"{codecs}: drew {frames} frames in 30 s, sent {sent}, {len(late)} late")
        assert frames > 100, f"the application drew only {frames} frames"
        assert sent >= frames * 0.9, (frames, stats)  # of what was drawn, not of a nominal rate
        assert len(late) <= frames * 0.03, f"{len(late)} late frames of {frames}, e.g. {late[:3]}"
        report = stats["last_report"]
        assert report and report["num_frames"] > 0, report  # reports reach the controller


def seconds_of_day(t: datetime.datetime) -> float:
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def in_window(line: str, start: float) -> bool:
    """Whether a spice-gtk debug line ("GSpice-DEBUG: HH:MM:SS.mmm: ...") was logged at or
    after `start` (seconds of the day); lines without a stamp count as in the window."""
    match = re.search(r"DEBUG: (\d\d):(\d\d):(\d\d)\.(\d{3})", line)
    if match is None:
        return True
    h, m, sec, ms = (int(g) for g in match.groups())
    stamp = h * 3600 + m * 60 + sec + ms / 1000
    return stamp >= start or start - stamp > 12 * 3600  # (a window across midnight)


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

    drawn = [0]
    completed = threading.Event()
    server.on_gl_draw_done = lambda cookie: (done.append(cookie), completed.set())

    def produce():
        # Like a real producer, render the next frame only once the server has finished with
        # the last draw (GL_DRAW_DONE; the server completes every draw within 1 s): the
        # scanout is one buffer, and writing it while the encoder reads it would tear.
        period, next_at = 1 / 30, time.monotonic()
        while not stop.is_set():
            k = drawn[0]
            frame = base_frame()
            paint_square_and_code(frame, k)
            pixels[:] = frame if y0_top else frame[::-1]
            drawn[0] = k + 1
            completed.clear()
            server.display.gl_draw(0, 0, W, H, k)
            completed.wait(2)
            next_at += period
            stop.wait(max(0.0, next_at - time.monotonic()))

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
            seen, shot = observe(x, mapping, lambda: drawn[0])
            x.save(shot, tmp_path / "scanout.png")
            judge_motion(seen)
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


# -- late joiners ---------------------------------------------------------------------------------
# How soon a joiner sees the picture is a speed target (bench/first_frame.py); these tests show
# that it does, at once rather than at the producer's next frame (an idle producer has none).
# Measured from the display channel's link: 0.3 s (idle scanout, desktop at rest) to 0.8 s
# (a running stream: remote-viewer builds its decoder first) on an idle 2-core machine; the
# bound keeps 3x margin over a loaded one.
JOIN_BOUND_S = 5.0


def shows_frame(shot: np.ndarray, k: int) -> bool:
    """The screen shows the picture of frame `k`: markers, its number, its square."""
    mapping = locate(shot)
    if mapping is None or framecode.read(shot, mapping[0], *CODE_AT) != k:
        return False
    centre = square_on_screen(shot, mapping)
    return centre is not None and abs(centre[0] - (square_x(k) + SQUARE / 2)) <= 6


def seconds_to_picture(x: xclient.XSession, server, shows: Callable[[np.ndarray], bool],
                       timeout: float = 20) -> float:
    """From the viewer's display channel linking (the server's stats list it) to the first
    screen grab that `shows` the picture; grabs take milliseconds (XSession.grab)."""
    linked = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if linked is None and len(server.stats()["clients"]) > 0:
            linked = time.monotonic()
        if linked is not None and shows(x.grab()):
            return time.monotonic() - linked
        time.sleep(0.01)
    x.save(x.screenshot(), x.log_dir / "never-shown.png")
    raise AssertionError(f"the picture never appeared ({'linked' if linked else 'never linked'})")


def test_remote_viewer_joining_an_idle_scanout_sees_it(tmp_path):
    """A scanout drawn once, then idle for 5 s: a viewer that connects now shows it. (Its first
    frame was once stamped with the draw's capture time: spice-gtk dropped it as 5 s late and
    showed black, and nothing followed.)"""
    import mmap
    import os

    from spicestream.display.scanout import fourcc

    stride = W * 4
    fd = os.memfd_create("scanout")
    os.ftruncate(fd, stride * H)
    buffer = mmap.mmap(fd, stride * H)
    pixels = np.frombuffer(buffer, np.uint8).reshape(H, W, 4)
    server = spicestream.Server(port=0, width=W, height=H, video_codecs="gstreamer:h264").start()
    try:
        frame = base_frame()
        paint_square_and_code(frame, 7)
        pixels[:] = frame
        server.display.gl_scanout(fd, W, H, stride, fourcc("XR24"))
        server.display.gl_draw(0, 0, W, H, "only")
        time.sleep(5)  # the producer is idle from here on
        with xclient.XSession(1024, 768, log_dir=tmp_path) as x:
            x.env["SPICE_DEBUG"] = "1"
            x.start_viewer(f"spice://127.0.0.1:{server.port}")
            waited = seconds_to_picture(x, server, lambda shot: shows_frame(shot, 7))
        print(f"idle scanout shown {waited * 1000:.0f} ms after the display channel linked")
        assert waited <= JOIN_BOUND_S
    finally:
        server.stop()
        server.display.gl_release()
        del pixels
        buffer.close()
        os.close(fd)


def test_remote_viewer_joining_a_running_shared_stream_sees_it(tmp_path):
    """A headless client keeps an H.264 encoder running; remote-viewer joins that encoder (one
    encode for both) and shows a current frame: the joiner is owed a key frame at once."""
    from spicestream.protocol.constants import DisplayCap
    from spicestream.testing.client import TestClient

    caps = (DisplayCap.SIZED_STREAM, DisplayCap.STREAM_REPORT, DisplayCap.MULTI_CODEC,
            DisplayCap.CODEC_H264, DisplayCap.CODEC_MJPEG)
    server = spicestream.Server(port=0, width=W, height=H, video_codecs="gstreamer:h264",
                                streaming_video="all").start()
    try:
        with Player(server.display) as player, \
                TestClient("127.0.0.1", server.port, display_caps=caps, decode_streams=False) as first:
            first.wait_for(lambda c: len(c.stream_log) > 30, timeout=20, what="the first client's stream")
            with xclient.XSession(1024, 768, log_dir=tmp_path) as x:
                x.start_viewer(f"spice://127.0.0.1:{server.port}")
                shown = []

                def current(shot):
                    mapping = locate(shot)
                    k = framecode.read(shot, mapping[0], *CODE_AT) if mapping else None
                    # A frame drawn within the last second, where that frame put its square.
                    if k is not None and player.k - 30 <= k < player.k and shows_frame(shot, k):
                        shown.append(k)
                        return True
                    return False

                waited = seconds_to_picture(x, server, current)
                streams = [c["streams"]["active"] for c in server.stats()["clients"]]
        print(f"running stream shown {waited * 1000:.0f} ms after the display channel linked (frame {shown})")
        assert waited <= JOIN_BOUND_S
        assert len(streams) == 2 and all(s and s["shared_by"] == 2 for s in streams), streams
    finally:
        server.stop()


# Colours (RGB) a decoder converting with the wrong matrix (BT.709 for BT.601) shows 15-45
# levels off: red, green, blue, cyan, magenta, yellow, and two mixed ones.
BAR_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0),
               (200, 90, 40), (30, 60, 200)]


class BarsPlayer(Paced):
    """Colour bars over the whole display, and a white square sliding along the top band so
    that every frame is new; full-screen damage, as a video player gives."""

    def __init__(self, display, width: int, height: int):
        self.display, self.width, self.height = display, width, height
        self.base = np.zeros((height, width, 4), np.uint8)
        edges = np.linspace(0, width, len(BAR_COLOURS) + 1).astype(int)
        for (r, g, b), x0, x1 in zip(BAR_COLOURS, edges, edges[1:]):
            self.base[height // 4:, x0:x1, :3] = (b, g, r)
        self.base[..., 3] = 255
        super().__init__(30)

    def draw(self, k: int) -> None:
        frame = self.base.copy()
        x = (k * 8) % (self.width - 64)
        frame[32:96, x:x + 64, :3] = 255
        self.display.update(frame, damage=[(0, 0, self.width, self.height)])


@pytest.mark.parametrize("codecs,decoder,size", [
    ("gstreamer:h264", "avdec_h264", (1280, 720)),  # libyuv's BT.601, said in the stream's VUI
    ("gstreamer:h264", "avdec_h264", (640, 480)),
    ("gstreamer:vp8", "vp8dec", (1280, 720)),  # videoconvert's BT.709, which vp8dec assumes here
], ids=["h264-720p", "h264-480p", "vp8-720p"])
def test_remote_viewer_shows_the_colours_sent(codecs, decoder, size, tmp_path):
    """The colour conversion before the encoder and the client's after its decoder use the
    same matrix: each bar's colour is on remote-viewer's screen, as sent, over a large area."""
    if not decoder_installed(decoder):
        pytest.skip(f"the client's GStreamer has no {decoder}")
    width, height = size
    server = spicestream.Server(port=0, width=width, height=height, video_codecs=codecs,
                                streaming_video="all")
    server.start()
    try:
        with xclient.XSession(1600, 1000, log_dir=tmp_path) as x, \
                BarsPlayer(server.display, width, height):
            x.find_window(x.start_viewer(f"spice://127.0.0.1:{server.port}"))
            xclient.wait_until(lambda: active_stream(server, 60), 30, 0.2, "a stream with frames")
            shot = x.screenshot()
            x.save(shot, tmp_path / "bars.png")
            stats = server.stats()["clients"][0]["streams"]
            assert stats["active"]["codec_entry"] == codecs and stats["failed_codecs"] == []
    finally:
        server.stop()
    # Each bar is 1/8 of the width by 3/4 of the height (86,400 pixels at 720p); a quarter of
    # that is asked for, room for the window scaling the display down (to ~0.87 here), counted
    # within 12 levels of the colour. With the other matrix none is that close.
    least = width * height * 3 // 4 // len(BAR_COLOURS) // 4
    pixels = shot.astype(np.int16)
    for rgb in BAR_COLOURS:
        near = int((np.abs(pixels - np.array(rgb, np.int16)) <= 12).all(axis=2).sum())
        assert near >= least, f"{rgb}: {near} pixels within 12 levels on screen, {least} expected"
