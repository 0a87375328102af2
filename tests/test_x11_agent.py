"""`--source x11` with the agent, against remote-viewer: the served X server's selections
reach the client's X display and back (xclip on both), and the served screen follows the
viewer's window through RandR: within Xvfb's fixed maximum, and freely on Xorg with the
dummy driver."""

from __future__ import annotations

import io
import logging
import queue
import subprocess
import threading

import numpy as np
import pytest
from PIL import Image

import spicestream

try:
    from . import xclient
    from .helpers import X11Export
except ImportError:
    import xclient
    from helpers import X11Export

_missing = xclient.missing_tools(xclient.REQUIRED_TOOLS + ("xclip", "xdpyinfo"))
if _missing:
    pytest.skip(f"needs {', '.join(_missing)}", allow_module_level=True)
pytest.importorskip("xcffib")


pytestmark = [pytest.mark.realclient, pytest.mark.timeout(150)]
WAIT_S = 20.0


class ServedDesktop:
    """An X server (Xvfb, or Xorg-dummy) exported by X11Source, and remote-viewer showing it
    on an Xvfb of its own. Resize requests are recorded on their way to the source."""

    def __init__(self, tmp_path, served: xclient.XSession, viewer_size=(1280, 1024)):
        self.x = served.start()
        self.server = spicestream.Server(port=0, width=64, height=64, streaming_video="off").start()
        self.export = X11Export(self.x, self.server)
        self.source = self.export.source
        self.requests: queue.Queue = queue.Queue()
        follow = self.server.on_resize

        def recorded(width, height):
            self.requests.put((width, height))
            follow(width, height)
        self.server.on_resize = recorded
        self.client = xclient.XSession(*viewer_size, log_dir=tmp_path / "client").start()
        self.viewer = self.client.start_viewer(f"spice://127.0.0.1:{self.server.port}")
        self.window = self.client.find_window(self.viewer)
        xclient.wait_until(self.agent_ready, WAIT_S, 0.1, "the agent's capabilities")
        # remote-viewer sizes its window to the desktop once the display shows: only a
        # window resized after that is the user's size.
        xclient.wait_until(self.settled, WAIT_S, 0.25, "the viewer's window settling")

    def settled(self) -> bool:
        geometries = []
        for _ in range(3):
            geometries.append(self.client.geometry(self.window))
            threading.Event().wait(0.25)
        shown = self.server._on_loop(lambda: [c.view is not None for c in self.server._core.display_channels])
        return bool(shown) and len(set(geometries)) == 1

    def agent_ready(self) -> bool:
        agents = self.server._on_loop(lambda: list(self.server._core.agents()))
        return bool(agents) and all(a.client_caps for a in agents)

    def resize_viewer(self, width: int, height: int) -> tuple[int, int]:
        while not self.requests.empty():
            self.requests.get()
        for _ in range(4):  # the size is asked again if the viewer had not taken it yet
            self.client.run("xdotool", "windowsize", str(self.window), str(width), str(height))
            try:
                return self.requests.get(timeout=WAIT_S / 4)
            except queue.Empty:
                pass
        raise AssertionError(f"no resize request after the window became {width}x{height}: "
                             f"it is {self.client.geometry(self.window)}")

    def close(self):
        self.client.close()
        self.export.close()
        self.server.stop()
        self.x.close()


@pytest.fixture
def desktop(tmp_path):
    d = ServedDesktop(tmp_path, xclient.XSession(1024, 768, log_dir=tmp_path / "served"))
    yield d
    d.close()


def xclip_in(x, data: bytes, selection="clipboard", target=None):
    args = ["xclip", "-selection", selection, "-i"] + (["-t", target] if target else [])
    subprocess.run(args, input=data, env=x.env, timeout=10, check=True)


def xclip_out(x, selection="clipboard", target=None) -> bytes:
    args = ["xclip", "-selection", selection, "-o"] + (["-t", target] if target else [])
    result = subprocess.run(args, env=x.env, capture_output=True, timeout=15)
    return result.stdout if result.returncode == 0 else b""


def png_bytes(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def same_png(data: bytes, pixels) -> bool:
    if not data.startswith(b"\x89PNG"):
        return False
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return got.shape == pixels.shape and bool((got == pixels).all())


def arrives(read, want, what):
    xclient.wait_until(lambda: read() == want, WAIT_S, 0.25, what)


def test_selections_cross_between_the_served_desktop_and_the_client(desktop):
    served, client = desktop.x, desktop.client
    # Served desktop -> client, both selections.
    xclip_in(served, "copied on the desktop ✓".encode())
    arrives(lambda: xclip_out(client), "copied on the desktop ✓".encode(), "desktop text on the client")
    xclip_in(served, b"desktop primary", "primary")
    arrives(lambda: xclip_out(client, "primary"), b"desktop primary", "desktop primary on the client")
    # Client -> served desktop.
    xclip_in(client, "copied in the viewer ✓".encode())
    arrives(lambda: xclip_out(served), "copied in the viewer ✓".encode(), "viewer text on the desktop")
    # Images, both ways.
    rng = np.random.default_rng(11)
    theirs = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    xclip_in(served, png_bytes(theirs), target="image/png")
    xclient.wait_until(lambda: same_png(xclip_out(client, target="image/png"), theirs), WAIT_S, 0.25,
                       "the desktop's image on the client")
    ours = rng.integers(0, 256, (21, 58, 3), dtype=np.uint8)
    xclip_in(client, png_bytes(ours), target="image/png")
    xclient.wait_until(lambda: same_png(xclip_out(served, target="image/png"), ours), WAIT_S, 0.25,
                       "the viewer's image on the desktop")


def test_a_megabyte_of_text_crosses_in_pieces_both_ways(desktop):
    """Over 256 KiB the bridge serves X requestors in INCR pieces; the client gets it in
    2 KiB agent chunks."""
    served, client = desktop.x, desktop.client
    big = (b"0123456789abcdef" * 65536)[: 1 << 20]
    xclip_in(client, big)
    arrives(lambda: xclip_out(served), big, "a megabyte from the viewer on the desktop")
    big2 = bytes(reversed(big))
    xclip_in(served, big2)
    arrives(lambda: xclip_out(client), big2, "a megabyte from the desktop on the client")


def test_xvfb_screen_shrinks_to_the_window_and_says_once_it_cannot_grow(desktop, caplog):
    caplog.set_level(logging.INFO, logger="spicestream.x11")
    width, height = desktop.resize_viewer(800, 600)
    assert width <= 800 and height < 600
    xclient.wait_until(lambda: desktop.x.screen_size() == (width, height), WAIT_S, 0.2,
                       f"the served screen at {width}x{height}")
    xclient.wait_until(lambda: (desktop.server.display.width, desktop.server.display.height) == (width, height),
                       WAIT_S, 0.1, "the display following the X screen")
    for size in ((1200, 950), (1210, 960)):  # beyond Xvfb's 1024x768 maximum, twice
        desktop.resize_viewer(*size)
    assert desktop.x.screen_size() == (width, height)
    refusals = [r for r in caplog.records if "cannot resize the X screen" in r.getMessage()]
    assert len(refusals) == 1 and "Xvfb" in refusals[0].getMessage(), [r.getMessage() for r in refusals]


def test_xorg_dummy_screen_follows_the_window_both_ways(tmp_path):
    served = xclient.XorgDummySession(800, 600, log_dir=tmp_path / "served")
    try:
        served.start()
    except RuntimeError as exc:
        pytest.skip(f"Xorg with the dummy driver does not start here: {exc}")
    d = ServedDesktop(tmp_path, served, viewer_size=(1600, 1200))
    sizes = []
    try:
        for window in ((1300, 1000), (700, 560)):  # beyond the start size, then below it
            width, height = d.resize_viewer(*window)
            xclient.wait_until(lambda: d.x.screen_size() == (width, height), WAIT_S, 0.2,
                               f"the served screen at {width}x{height}")
            xclient.wait_until(lambda: (d.server.display.width, d.server.display.height) == (width, height),
                               WAIT_S, 0.1, "the display following the X screen")
            sizes.append((width, height))
    finally:
        d.close()
    (grown_w, grown_h), (shrunk_w, shrunk_h) = sizes
    assert grown_w > 800 and grown_h > 600 and shrunk_w < 800 and shrunk_h < 600, sizes


def test_modes_made_for_passing_sizes_do_not_pile_up(tmp_path):
    """A window dragged wider asks for size after size: each new size gets a mode, and the
    ones left behind are deleted, so the X server lists ours only for the size it has."""
    from spicestream.sources.x11randr import X11Resizer

    served = xclient.XorgDummySession(800, 600, log_dir=tmp_path / "served")
    try:
        served.start()
    except RuntimeError as exc:
        pytest.skip(f"Xorg with the dummy driver does not start here: {exc}")
    resizer = X11Resizer(served.display)
    try:
        sizes = [(1000 + 2 * i, 700 + 2 * i) for i in range(6)] + [(1000, 700)]
        for width, height in sizes:
            assert resizer.resize(width, height)
            assert served.screen_size() == (width, height)
        listed = subprocess.run(["xrandr", "--display", served.display, "--verbose"], capture_output=True,
                                text=True, check=True).stdout
        ours = sorted({word for word in listed.split() if word.endswith("_spicestream")})
        assert ours == ["1000x700_spicestream"], ours
    finally:
        resizer.close()
        served.close()


class IncrOwner:
    """An X application that owns CLIPBOARD and answers UTF8_STRING in INCR pieces (ICCCM
    2.7.2): the next piece each time the requestor deletes the property. `pieces` yields
    them; one that never ends is an owner that waits for ever (as xclip does)."""

    def __init__(self, display: str, pieces):
        import xcffib
        import xcffib.xproto

        self.xp, self.pieces = xcffib.xproto, pieces
        self.conn = xcffib.connect(display=display)
        screen = self.conn.get_setup().roots[0]
        self.window = self.conn.generate_id()
        self.conn.core.CreateWindow(0, self.window, screen.root, -1, -1, 1, 1, 0, self.xp.WindowClass.InputOnly,
                                    screen.root_visual, 0, [])
        self.atom = {n: self.conn.core.InternAtom(False, len(n), n).reply().atom
                     for n in ("CLIPBOARD", "TARGETS", "UTF8_STRING", "INCR", "ATOM")}
        self.transfers: dict = {}  # (requestor, property) -> piece iterator
        self.written = 0  # pieces written
        self.stop = threading.Event()
        self.conn.core.SetSelectionOwner(self.window, self.atom["CLIPBOARD"], 0)
        self.conn.flush()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            event = self.conn.poll_for_event()
            if event is None:
                self.stop.wait(0.005)
            elif isinstance(event, self.xp.SelectionRequestEvent):
                self._answer(event)
            elif isinstance(event, self.xp.PropertyNotifyEvent) and event.state == self.xp.Property.Delete:
                pieces = self.transfers.get((event.window, event.atom))
                if pieces is not None:
                    piece = next(pieces, b"")
                    self._set(event.window, event.atom, self.atom["UTF8_STRING"], 8, piece)
                    self.written += 1
                    if not piece:
                        del self.transfers[(event.window, event.atom)]
            self.conn.flush()

    def _set(self, window, prop, kind, fmt, data: bytes):
        count = len(data) // (fmt // 8)
        self.conn.core.ChangeProperty(self.xp.PropMode.Replace, window, prop, kind, fmt, count, data)

    def _answer(self, event):
        if event.target == self.atom["TARGETS"]:
            self._set(event.requestor, event.property, self.atom["ATOM"], 32,
                      np.array([self.atom["UTF8_STRING"]], "<u4").tobytes())
        else:
            self.conn.core.ChangeWindowAttributes(event.requestor, self.xp.CW.EventMask,
                                                  [self.xp.EventMask.PropertyChange])
            self.transfers[(event.requestor, event.property)] = iter(self.pieces)
            self._set(event.requestor, event.property, self.atom["INCR"], 32, np.array([1 << 20], "<u4").tobytes())
        notify = self.xp.SelectionNotifyEvent.synthetic(event.time, event.requestor, event.selection,
                                                        event.target, event.property)
        self.conn.core.SendEvent(False, event.requestor, 0, notify.pack())

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.conn.disconnect()


def test_a_given_up_incr_transfer_does_not_leak_into_the_next(tmp_path, caplog):
    """An owner whose INCR transfer runs past max_clipboard is given up, and goes on waiting to
    write its next piece whenever the property it was given is deleted. The next owner's INCR
    transfer must bring its own text, whole: none of the first owner's pieces."""
    import itertools

    from spicestream.sources.x11clip import X11ClipboardBridge

    caplog.set_level(logging.INFO, logger="spicestream.x11clip")
    x = xclient.XSession(320, 240, log_dir=tmp_path).start()
    server = spicestream.Server(port=0, width=320, height=240, max_clipboard=16384)
    got = queue.Queue()
    server.set_clipboard = lambda data, mime, selection: got.put((bytes(data), mime, selection))
    bridge = X11ClipboardBridge(x.display, server, 16384)
    owners = []
    try:
        leaky = IncrOwner(x.display, itertools.repeat(b"LEAK" * 2048))  # 8 KiB pieces, no end
        owners.append(leaky)
        xclient.wait_until(lambda: any("over 16384 bytes" in r.getMessage() for r in caplog.records),
                           WAIT_S, 0.05, "the first transfer given up")
        assert got.empty()
        written = leaky.written
        good = b"".join(b"good %05d\n" % i for i in range(1200))  # 12 KiB in 2 KiB pieces
        owners.append(IncrOwner(x.display, [good[i:i + 2048] for i in range(0, len(good), 2048)]))
        data, mime, selection = got.get(timeout=WAIT_S)
        assert (data == good, mime, selection) == (True, "text/plain;charset=utf-8", "clipboard"), data[:64]
        assert leaky.written == written  # nothing made it write again
    finally:
        for owner in owners:
            owner.close()
        bridge.close()
        x.close()
