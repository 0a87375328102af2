"""Export a running X server: pixels, typing, cursor shape, and a clear error without the
extensions we need. The served desktop is an Xvfb of its own; remote-viewer runs on another."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import spicestream
from spicestream.protocol.messages import SERVER
from spicestream.testing.client import TestClient

import xclient
from helpers import X_SERVER_CHURNING_TUNABLES, WindowImages, X11Export
from test_remote_viewer_streams import JOIN_BOUND_S, base_frame, locate, seconds_to_picture

pytestmark = pytest.mark.skipif(
    bool(xclient.missing_tools(("Xvfb", "xdotool", "import", "xterm", "xsetroot"))),
    reason="needs Xvfb, xdotool, imagemagick, xterm, xsetroot")
pytest.importorskip("xcffib")

from spicestream.sources.x11 import RING, X11Error, X11Source  # noqa: E402

W, H = 640, 480


class Served:
    """A served X desktop + spicestream exporting it from a thread."""

    def __init__(self, tmp_path, view_only=False, xvfb_args=(), **server_options):
        self.x = xclient.XSession(W, H, log_dir=tmp_path / "served")
        self.x.start()
        options = {"streaming_video": "off", **server_options}
        self.server = spicestream.Server(port=0, width=64, height=64, **options).start()
        self.export = X11Export(self.x, self.server, view_only=view_only)
        self.source = self.export.source

    def close(self):
        self.export.close()
        self.server.stop()
        self.x.close()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.close()


def show_picture(x: xclient.XSession, picture: np.ndarray, tmp_path) -> WindowImages:
    """A full-screen window on the served display showing a BGRx picture (our own X client)."""
    images = WindowImages(x.display, W, H)
    images.put(np.ascontiguousarray(picture).data)
    images.round_trip()  # everything above is drawn
    return images


def markers_rgb() -> np.ndarray:
    return base_frame()  # 640x480 BGRx with coloured corner markers


def test_client_sees_exactly_what_the_x_server_shows(served, tmp_path):
    picture = show_picture(served.x, markers_rgb(), tmp_path)  # noqa: F841 (keeps the window)
    with TestClient("127.0.0.1", served.server.port) as client:
        def same(c):
            shot = served.x.screenshot()
            return c.frame is not None and c.frame.shape[:2] == (H, W) and \
                np.array_equal(c.frame[..., 2::-1], shot)
        client.wait_for(same, timeout=20, what="the client's picture to equal an import of the X display")


def test_remote_viewer_shows_the_x_desktop(served, tmp_path):
    picture = show_picture(served.x, markers_rgb(), tmp_path)  # noqa: F841 (keeps the window)
    served_shot = served.x.screenshot()
    assert (served_shot[0, 0] == (255, 0, 0)).all()
    with xclient.XSession(1024, 768, log_dir=tmp_path / "client") as viewer_x:
        viewer = viewer_x.start_viewer(f"spice://127.0.0.1:{served.server.port}")
        viewer_x.find_window(viewer)
        to_screen, _ = xclient.wait_until(lambda: locate(viewer_x.screenshot()), 20, 0.3, "the markers")
        shot = viewer_x.screenshot()
        viewer_x.save(shot, tmp_path / "viewer.png")
        # Same pixels at a grid of points (the viewer shows the display 1:1 or scaled).
        for y in range(8, H, 37):
            for x in range(8, W, 41):
                sx, sy = to_screen(x + 0.5, y + 0.5)
                got = shot[int(sy), int(sx)].astype(int)
                want = served_shot[y, x].astype(int)
                assert np.abs(got - want).max() <= 12, ((x, y), got, want)


def test_only_damaged_rows_are_captured_and_every_frame_stays_whole(served, tmp_path):
    """Small changes are read from the X server as the rows they touch, into a ring whose
    segments each catch up on what they missed; what a client ends with is still exactly
    the screen, after every change."""
    import xcffib.xproto as xp

    picture = show_picture(served.x, markers_rgb(), tmp_path)
    conn = picture.conn
    with TestClient("127.0.0.1", served.server.port) as client:
        client.wait_for(lambda c: c.frame is not None and c.frame.shape[:2] == (H, W), what="the desktop")
        gc = conn.generate_id()
        conn.core.CreateGC(gc, picture.window, xp.GC.Foreground, [0x00FF8000])

        def fill(x, y, w, h):
            conn.core.PolyFillRectangle(picture.window, gc, 1, [xp.RECTANGLE.synthetic(x, y, w, h)])
            conn.core.GetInputFocus().reply()  # drawn before we go on
            time.sleep(0.1)  # over a capture tick (1/30 s): one change per frame

        # Until every segment of the ring has caught up on the whole first picture: RING
        # captures in a row that read one band of a row or two (two fills that a loaded
        # machine captures together count as one).
        quiet, deadline = 0, time.monotonic() + 20
        while quiet < RING and time.monotonic() < deadline:
            before = served.source.rows_captured
            fill(0, 0, 1, 1)
            quiet = quiet + 1 if 0 < served.source.rows_captured - before <= 2 else 0
        assert quiet == RING, "the ring never caught up"
        rows_before = served.source.rows_captured
        for k in range(12):  # a small block moves down and right
            fill(40 + 20 * k, 30 + 25 * k, 24, 16)

        def same(c):
            shot = served.x.screenshot()
            return np.array_equal(c.frame[..., 2::-1], shot)
        client.wait_for(same, timeout=20, what="the client's picture to equal the X display after the changes")
        rows = served.source.rows_captured - rows_before
        # Twelve 16-row changes, each read into every segment of the ring as it catches up:
        # at most 12 * 16 * RING rows, where whole-screen captures would read 12 * H.
        assert 0 < rows <= 12 * 16 * RING + RING, rows


def test_remote_viewer_joining_a_desktop_at_rest_sees_it(tmp_path):
    """A desktop left alone for 5 s, served with video streaming on: a viewer that connects
    shows it (exact pixels at a grid of points) at once."""
    s = Served(tmp_path, streaming_video="filter", video_codecs="gstreamer:h264")
    try:
        picture = show_picture(s.x, markers_rgb(), tmp_path)  # noqa: F841 (keeps the window)
        served_shot = s.x.screenshot()
        time.sleep(5)
        with xclient.XSession(1024, 768, log_dir=tmp_path / "client") as viewer_x:
            viewer_x.start_viewer(f"spice://127.0.0.1:{s.server.port}")

            def shows_the_desktop(shot):
                mapping = locate(shot)
                if mapping is None:
                    return False
                to_screen = mapping[0]
                for y in range(8, H, 37):
                    for x in range(8, W, 41):
                        sx, sy = to_screen(x + 0.5, y + 0.5)
                        if np.abs(shot[int(sy), int(sx)].astype(int) - served_shot[y, x].astype(int)).max() > 12:
                            return False
                return True

            waited = seconds_to_picture(viewer_x, s.server, shows_the_desktop)
        print(f"desktop at rest shown {waited * 1000:.0f} ms after the display channel linked")
        assert waited <= JOIN_BOUND_S
    finally:
        s.close()


def test_typing_in_remote_viewer_reaches_an_xterm(served, tmp_path):
    out = tmp_path / "typed.txt"
    term = served.x.spawn(["xterm", "-geometry", "60x10+20+20", "-e", "sh", "-c", f'read line; echo "$line" > {out}'],
                          name="xterm")
    xterm_window = served.x.find_window(term, class_name="xterm")
    served.x.focus(xterm_window)
    with xclient.XSession(1024, 768, log_dir=tmp_path / "client") as viewer_x:
        viewer = viewer_x.start_viewer(f"spice://127.0.0.1:{served.server.port}")
        window = viewer_x.find_window(viewer)
        xclient.wait_until(lambda: served.server.sessions == 1, 10, 0.1, "the session")
        time.sleep(1.0)  # the display and inputs channels come up
        viewer_x.focus(window)
        viewer_x.type("hello spice")
        viewer_x.key("Return")
        text = xclient.wait_until(lambda: out.exists() and out.read_text().strip(), 10, 0.2, "the typed line")
    assert text == "hello spice"


def test_cursor_shape_follows_the_x_server(served):
    term = served.x.spawn(["xterm", "-geometry", "80x24+0+0"], name="xterm")
    served.x.find_window(term, class_name="xterm")
    with TestClient("127.0.0.1", served.server.port) as client:
        client.wait_for(lambda c: c.cursor is not None)
        served.x.move(600, 400)
        served.x.move(100, 100)  # over the xterm: the displayed cursor becomes its I-beam
        client.wait_for(lambda c: any(type(m) is SERVER.CURSOR_SET for m in c.messages), timeout=10,
                        what="a CURSOR_SET")
        shape = [m for m in client.messages if type(m) is SERVER.CURSOR_SET][-1].cursor
        width, height = int.from_bytes(shape[11:13], "little"), int.from_bytes(shape[13:15], "little")
        pixels = np.frombuffer(shape[19:], np.uint8).reshape(height, width, 4)
        assert (pixels[..., 3] > 0).sum() > 20 and shape != client.cursor.cursor


def test_missing_extensions_are_named(tmp_path):
    # A display without MIT-SHM and DAMAGE: an Xvfb started with them turned off.
    xvfb = shutil.which("Xvfb")
    for number in range(130, 160):
        proc = subprocess.Popen([xvfb, f":{number}", "-screen", "0", "320x240x24", "-extension", "MIT-SHM",
                                 "-extension", "DAMAGE", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        if proc.poll() is None:
            break
    try:
        server = spicestream.Server(port=0, width=64, height=64)
        with pytest.raises(X11Error, match="MIT-SHM, DAMAGE"):
            X11Source(f":{number}", server)
        result = subprocess.run([sys.executable, "-m", "spicestream", "serve", "--port", "0", "--source",
                                 "x11", "--x-display", f":{number}"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "MIT-SHM, DAMAGE" in result.stderr, result.stderr
    finally:
        proc.kill()
        proc.wait(5)


def test_view_only_ignores_input(tmp_path):
    s = Served(tmp_path, view_only=True)
    try:
        assert s.server.on_key is None and s.server.on_pointer is None
    finally:
        s.close()


def test_an_absurd_pointer_position_is_clamped_to_the_screen(served, caplog):
    """MOUSE_POSITION with x = y = 0xFFFFFFFF (XTEST takes 16-bit coordinates): the pointer
    goes to the bottom-right corner; nothing is logged as an error."""
    import logging

    from spicestream.protocol.constants import ChannelType as Ch
    from spicestream.protocol.messages import CLIENT

    caplog.set_level(logging.INFO, logger="spicestream")
    with TestClient("127.0.0.1", served.server.port) as client:
        client.wait_for(lambda c: c.frame is not None and c.frame.shape[:2] == (H, W), what="the desktop")
        for x, y in ((0xFFFFFFFF, 0xFFFFFFFF), (70000, 5), (5, 70000)):
            client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_POSITION(x, y, 0, 0))
            expect = (min(x, W - 1), min(y, H - 1))

            def where():
                out = served.x.run("xdotool", "getmouselocation")
                fields = dict(f.split(":") for f in out.split())
                return (int(fields["x"]), int(fields["y"])) == expect

            xclient.wait_until(where, 10, 0.1, f"the pointer at {expect}")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_damaged_rows_merge_into_bands():
    from spicestream.sources.x11 import damaged_rows

    assert damaged_rows(None, 480) == [(0, 480)]
    assert damaged_rows([], 480) == []
    rects = [(0, 10, 5, 5), (100, 12, 5, 10), (0, 40, 640, 2), (3, 470, 9, 50), (0, -5, 3, 3), (1, 2, 3, 0)]
    assert damaged_rows(rects, 480) == [(10, 22), (40, 42), (470, 480)]


def test_capture_pacer_allows_fps_on_average_and_absorbs_jitter():
    from spicestream.sources.x11drive import CapturePacer

    pacer = CapturePacer(30)
    now = 0.0
    pacer.captured(now)
    # A producer at 30 fps with +-8 ms of jitter: every draw is captured at once.
    for k in range(1, 300):
        now = k / 30 + (0.008 if k % 2 else -0.008)
        assert pacer.delay(now) == 0.0, k
        pacer.captured(now)
    # A producer drawing as fast as it can gets 30 captures a second, not more.
    captures, now = 0, 100.0
    while now < 110.0:
        wait = pacer.delay(now)
        if wait == 0.0:
            pacer.captured(now)
            captures += 1
        now += max(wait, 0.001)
    assert 299 <= captures <= 302, captures


def test_a_capture_racing_a_screen_resize_takes_the_new_size(tmp_path):
    """Damage reported before the screen shrank, captured before its ScreenChangeNotify is
    read: a capture of the old size does not fit the new screen (BadMatch). The source takes
    the size the screen has now instead of dying (a red clean-clone run: before, the capture
    thread ended on the X error and the display stopped following)."""
    from spicestream.sources.x11randr import X11Resizer

    with xclient.XSession(W, H, log_dir=tmp_path / "served") as x:
        server = spicestream.Server(port=0, width=64, height=64, streaming_video="off").start()
        source = X11Source(x.display, server, fps=30)
        resizer = X11Resizer(x.display)
        try:
            source.capture(None)
            assert resizer.resize(W - 100, H - 80)
            source.capture_changes([(0, 0, W, H)], None)  # the damage, as the loop had it
            assert (server.display.width, server.display.height) == (W - 100, H - 80)
            assert (source.width, source.height) == (W - 100, H - 80)
        finally:
            resizer.close()
            source.close()
            server.stop()


RESIZE_WHILE_CLOSING = """
import sys, threading, time
from spicestream.sources.x11randr import X11Resizer
for _ in range(10):
    resizer = X11Resizer(sys.argv[1])
    stop = threading.Event()
    def resize_on():  # as the server's thread does for a client's window size
        k = 0
        while not stop.is_set():
            resizer.resize(*((800, 600) if k % 2 else (1024, 768)))
            k += 1
    thread = threading.Thread(target=resize_on)
    thread.start()
    time.sleep(0.05)
    resizer.close()  # as the source does when it stops
    assert resizer.resize(800, 600) is False and resizer.conn is None, "a resize after close reconnected"
    stop.set()
    thread.join()
print("closed cleanly")
"""


def test_closing_the_resizer_while_a_resize_runs_on_another_thread(tmp_path):
    """`spicestream run` stopped right after a client resized the screen died of SIGABRT once
    in a clean-clone run: close() freed the xcb connection under a resize still running on the
    server's thread (here: 'malloc(): unsorted double linked list corrupted'). Run in a child
    process, so a crash is an exit status, not a dead test run."""
    with xclient.XSession(1024, 768, log_dir=tmp_path / "served") as x:
        result = subprocess.run([sys.executable, "-c", RESIZE_WHILE_CLOSING, x.display],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "closed cleanly" in result.stdout, result.stderr[-2000:]


def test_the_capture_loop_outlives_an_x_error_and_follows_a_screen_change(served, tmp_path):
    """The loop reads X events raw (sources/xcb.py). An error for a request nobody waits on
    comes as an event: it is logged, and capture goes on (through xcffib it was raised out
    of the event poll and ended the capture thread). A RandR screen change read from the
    queue resizes the display."""
    from spicestream.sources.x11randr import X11Resizer

    source = served.source
    with TestClient("127.0.0.1", served.server.port) as client:
        client.wait_for(lambda c: c.frame is not None and c.frame.shape[:2] == (H, W), what="the desktop")
        with source.lock:
            source.conn.core.FreePixmap(0x1FFFFF)  # no such pixmap: BadPixmap, queued for the loop
            source.conn.flush()
        source.conn.core.GetInputFocus().reply()  # the error is in the queue before we go on
        picture = show_picture(served.x, markers_rgb(), tmp_path)
        try:
            client.wait_for(lambda c: np.array_equal(c.frame[..., 2::-1], served.x.screenshot()),
                            timeout=20, what="the picture drawn after the error")
        finally:
            picture.close()
        assert served.export.thread.is_alive()
        resizer = X11Resizer(served.x.display)
        try:
            assert resizer.resize(W - 100, H - 80)
            client.wait_for(lambda c: c.frame is not None and c.frame.shape[:2] == (H - 80, W - 100),
                            timeout=20, what="the client's surface at the new screen size")
        finally:
            resizer.close()
        assert (source.width, source.height) == (W - 100, H - 80)


def test_a_capture_waiting_on_a_stopped_x_server_leaves_the_server_free(served):
    """Capture runs on the server's loop (sources/x11drive.py) and never waits there for the X
    server: with the X server stopped, a capture's requests are out and the loop still answers;
    the frame is published, on the server's thread, once the X server replies."""
    source, server = served.source, served.server
    xclient.wait_until(lambda: source.frames_captured >= 1 and not source.capturing, 20, 0.01,
                       "the first frame")
    published_on = []
    update = server.display.update

    def recording_update(frame, damage=None):
        published_on.append(threading.current_thread().name)
        update(frame, damage)

    server.display.update = recording_update
    frames = source.frames_captured
    os.kill(served.x.xvfb.pid, signal.SIGSTOP)
    try:
        server.loop.call_soon_threadsafe(source.begin_capture, None)
        server.stats()  # runs on the loop: it would time out (5 s) if the loop waited on the X server
        assert source.capturing and source.frames_captured == frames
    finally:
        os.kill(served.x.xvfb.pid, signal.SIGCONT)
    xclient.wait_until(lambda: source.frames_captured > frames, 20, 0.01,
                       "the frame after the X server went on")
    assert published_on and set(published_on) == {"spicestream"}, published_on  # the server's thread


def test_a_cursor_change_on_a_stopped_x_server_leaves_the_server_free(served):
    """The cursor's image is asked for and collected like a capture: with the X server
    stopped, the loop still answers; the image is shown once the X server replies."""
    source, server = served.source, served.server
    xclient.wait_until(lambda: source.frames_captured >= 1, 20, 0.01, "the first frame")
    shown = []
    show = source.show_cursor
    source.show_cursor = lambda *image: (shown.append(image[:4]), show(*image))
    pid = served.x.xvfb.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        def cursor_changed():  # as a CursorNotify does
            source._driver.cursor_wanted = True
            source._driver.service()

        server.loop.call_soon_threadsafe(cursor_changed)
        server.stats()  # runs on the loop: it would time out (5 s) if the loop waited on the X server
        assert shown == [] and source._driver.cursor_request is not None
    finally:
        os.kill(pid, signal.SIGCONT)
    xclient.wait_until(lambda: shown, 20, 0.01, "the cursor image")
    width, height, xhot, yhot = shown[0]
    assert 0 < width <= 64 and 0 < height <= 64 and 0 <= xhot < width and 0 <= yhot < height


def test_a_capture_reply_read_by_another_thread_is_still_collected(served):
    """A request made on the connection by another thread can read the capture's reply into
    libxcb's queue, where the socket no longer announces it: the driver looks again
    (RECHECK_S) rather than wait for unrelated X traffic (none comes on a desktop at rest)."""
    source, server = served.source, served.server
    xclient.wait_until(lambda: source.frames_captured >= 1 and not source.capturing, 20, 0.01,
                       "the first frame")
    frames = source.frames_captured
    pid = served.x.xvfb.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        def capture_as_the_driver_does():
            source.begin_capture(None)
            source._driver.service()  # finds the replies not in yet: looks again later

        server.loop.call_soon_threadsafe(capture_as_the_driver_does)
        xclient.wait_until(lambda: source.capturing, 20, 0.01, "the capture's requests")
        other = threading.Thread(target=lambda: source.conn.core.GetInputFocus().reply())
        other.start()
        time.sleep(0.2)  # let it wait on the socket first (if it does not, the loop reads the reply)
    finally:
        os.kill(pid, signal.SIGCONT)
    other.join(10)
    xclient.wait_until(lambda: source.frames_captured > frames, 20, 0.01,
                       "the frame whose reply the other thread read")


def test_a_capture_racing_a_resize_on_the_loop_follows_the_randr_event(served, caplog):
    """On the loop, a capture of the old size that the X server refuses (BadMatch: the screen
    shrank first) is followed by the ScreenChangeNotify sent before the error, not by asking
    the X server for the size: the next capture is whole, at the new size, and the export
    goes on."""
    import logging

    from spicestream.sources.x11randr import X11Resizer

    source, server = served.source, served.server
    xclient.wait_until(lambda: source.frames_captured >= 1 and not source.capturing, 20, 0.01,
                       "the first frame")
    resizer = X11Resizer(served.x.display)
    try:
        def resize_then_capture_the_old_size():
            assert resizer.resize(W - 100, H - 80)  # done (a round trip) before our request
            source.begin_capture(None)
            source._driver.service()

        with caplog.at_level(logging.INFO, logger="spicestream.x11"):
            server.loop.call_soon_threadsafe(resize_then_capture_the_old_size)
            xclient.wait_until(lambda: (server.display.width, server.display.height) == (W - 100, H - 80)
                               and source.frames_captured >= 2 and not source.capturing,
                               20, 0.01, "a capture at the new size")
        assert any("following the screen's next change" in r.getMessage() for r in caplog.records)
        assert source._driver.running and not served.export.stop.is_set()
    finally:
        resizer.close()


def test_the_capture_ends_with_x11error_when_the_x_server_exits(tmp_path):
    x = xclient.XSession(W, H, log_dir=tmp_path / "served").start()
    server = spicestream.Server(port=0, width=64, height=64, streaming_video="off").start()
    source = X11Source(x.display, server, fps=30)
    stop, errors = threading.Event(), []

    def run():
        try:
            source.run(stop)
        except X11Error as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        xclient.wait_until(lambda: source.frames_captured >= 1, 20, 0.01, "the first frame")
        x.close()
        thread.join(20)
        assert not thread.is_alive() and stop.is_set()
        assert len(errors) == 1 and "the X server has exited" in errors[0], errors
    finally:
        stop.set()
        thread.join(5)
        source.close()
        server.stop()
        x.close()


def test_the_resizer_connects_again_after_its_x_connection_broke(tmp_path):
    """A broken connection is dropped and the next resize makes a new one (the handler for
    broken connections came after the one for X errors, which also caught them: the dead
    connection was kept and every later resize failed)."""
    import os
    import socket

    from spicestream.sources.x11randr import X11Resizer

    with xclient.XSession(W, H, log_dir=tmp_path / "served") as x:
        resizer = X11Resizer(x.display)
        try:
            assert resizer.resize(W - 100, H - 80)
            # Break the link under libxcb without freeing its fd (a dup, shut down both ways).
            broken = socket.socket(fileno=os.dup(resizer.conn.get_file_descriptor()))
            broken.shutdown(socket.SHUT_RDWR)
            broken.close()
            assert not resizer.resize(W, H)
            assert resizer.conn is None
            assert resizer.resize(W, H)
            assert x.screenshot().shape[:2] == (H, W)
        finally:
            resizer.close()


def test_page_fault_rate_is_judged_per_window_of_enough_frames():
    from spicestream.sources.xpages import MIN_FRAMES, FaultRate

    rate = FaultRate(now=0.0, every=5.0)
    assert not rate.due(4.9) and rate.due(5.0)
    assert rate.sample(5.0, faults=1000, frames=10) is None  # the first sample is the baseline
    # Too few frames: not judged, and its faults (an idle desktop's) are not carried over.
    assert rate.sample(10.0, faults=9000, frames=10 + MIN_FRAMES - 1) is None
    assert not rate.due(14.9)
    frames = 10 + MIN_FRAMES - 1
    assert rate.sample(15.0, faults=9000 + 225 * MIN_FRAMES, frames=frames + MIN_FRAMES) == 225
    assert rate.sample(20.0, faults=9000 + 225 * MIN_FRAMES, frames=frames + 2 * MIN_FRAMES) == 0
    assert rate.sample(25.0, faults=5, frames=frames + 3 * MIN_FRAMES) is None  # a new X server
    assert rate.sample(30.0, faults=5 + 7 * MIN_FRAMES, frames=frames + 4 * MIN_FRAMES) == 7


def test_the_fresh_pages_hint_needs_two_windows_in_a_row_and_is_said_once(monkeypatch, caplog):
    """Pages touched once (new capture segments after a resize) fill one window; churn fills
    every one. The X server's pid comes from the socket's peer: here a socketpair, so ours."""
    import logging
    import os
    import socket

    from spicestream.sources import xpages

    faults = iter([0, 10_000, 10_000, 20_000, 30_000, 40_000, 50_000])  # per check, 100 frames apart
    monkeypatch.setattr(xpages, "minor_faults", lambda pid: next(faults))
    ours, theirs = socket.socketpair()
    try:
        hint = xpages.FreshPagesHint(":9", ours.fileno(), now=0.0, every=1.0)
    finally:
        ours.close()
        theirs.close()
    assert hint.pid == os.getpid()
    with caplog.at_level(logging.WARNING, logger="spicestream.x11"):
        said = []
        for k in range(1, 8):
            hint.check(float(k), 100 * k)
            said.append(len(caplog.records))
    # baseline; 100/frame (one window); 0; 100; 100 -> said; then no more checks
    assert said == [0, 0, 0, 0, 1, 1, 1], said
    assert "(pid %d)" % os.getpid() in caplog.records[0].getMessage()
    assert xpages.X_SERVER_MALLOC_TUNABLES in caplog.records[0].getMessage()


def _draw_frames(display: str, count: int) -> None:
    """Whole-window PutImages (1.2 MB: what glibc serves from mmap), one a capture, as an
    application without MIT-SHM draws."""
    images = WindowImages(display, W, H)
    try:
        for k in range(count):
            images.put(bytes([k % 256]) * (W * H * 4))
            images.round_trip()
            time.sleep(0.05)
    finally:
        images.close()


@pytest.mark.parametrize("started_by", ["default", "spicestream run"])
def test_an_x_server_taking_fresh_pages_for_each_draw_is_named_once(tmp_path, caplog, started_by):
    """Exporting an X server that faults in fresh pages for every large request logs, once, how
    to start it; the X server `spicestream run` starts (the malloc thresholds) gets no hint,
    though its window was judged the same way."""
    import logging

    from spicestream.session import PrivateXServer
    from spicestream.sources.xpages import FAULTS_PER_FRAME

    if started_by == "default":
        with pytest.MonkeyPatch.context() as env:  # the X server's environment only
            env.setenv("GLIBC_TUNABLES", X_SERVER_CHURNING_TUNABLES)
            x = xclient.XSession(W, H, log_dir=tmp_path / "served").start()
        pid, stop_x = x.xvfb.pid, x.close
    else:
        x = PrivateXServer("xvfb", (W, H), tmp_path).start()
        pid, stop_x = x.proc.pid, x.stop
    server = spicestream.Server(port=0, width=64, height=64, streaming_video="off").start()
    export = None
    try:
        with caplog.at_level(logging.WARNING, logger="spicestream.x11"):
            export = X11Export(x, server)
            hint = export.source.pages_hint
            assert hint.pid == pid
            hint.rate.every, hint.rate.min_frames = 1.0, 10  # windows of ~16 draws
            _draw_frames(x.display, 100)
            export.close()
            export = None
        hints = [r.getMessage() for r in caplog.records if "page faults a frame" in r.getMessage()]
        assert hint.rate.last is not None, "no window was judged"
        if started_by == "default":
            assert len(hints) == 1 and f"(pid {pid})" in hints[0] and "GLIBC_TUNABLES" in hints[0], hints
            assert hint.rate.last >= FAULTS_PER_FRAME
        else:
            assert hints == [] and hint.rate.last < FAULTS_PER_FRAME / 4, (hint.rate.last, hints)
    finally:
        if export is not None:
            export.close()
        server.stop()
        stop_x()
