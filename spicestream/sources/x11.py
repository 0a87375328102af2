"""Serve a running X server: capture with MIT-SHM, damage from DAMAGE, size from RandR,
cursor from XFIXES, input through XTEST, the client's window size back through RandR
(x11randr.py), the selections both ways (x11clip.py); changes are captured on the server's event
loop as the X server reports them (x11drive.py). An ordinary X client, through xcffib;
the capture's per-frame events and requests go to libxcb directly (xcb.py).

Capture goes into a ring of SysV shared-memory segments the X server writes into directly;
each published frame is a numpy view on one of them, so the picture reaches the encoder
without a copy on our side. The ring is long enough that the X server never overwrites a
segment an encoder may still be reading (display.update's contract).

Only what changed is captured: a segment is brought up to date with the rows damaged since it
was last written (the damage of the last RING ticks), read as full-width bands, because MIT-SHM
writes an image packed at its own width. A still desktop costs nothing; a blinking caret costs
a few rows.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

import numpy as np

from .x11clip import X11ClipboardBridge
from .xcb import RawXcb, XcbConnectionLost, XcbError
from .x11drive import CaptureDriver
from .x11randr import X11Resizer
from .xpages import FreshPagesHint

log = logging.getLogger("spicestream.x11")

REQUIRED_EXTENSIONS = ("MIT-SHM", "DAMAGE", "XFIXES", "XTEST", "RANDR")
RING = 4
SERVER_CHECK_S = 0.5  # how often run() looks whether the server still serves
FULL_CAPTURE_SHARE = 0.6  # bands covering more of the screen than this: one whole capture
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0

# SPICE set-1 scancodes of E0-prefixed keys -> Linux input keycodes (X evdev keycode = +8).
# Plain set-1 scancodes 0x01-0x58 equal their Linux keycodes.
EXTENDED_TO_LINUX = {
    0x11C: 96, 0x11D: 97, 0x135: 98, 0x137: 99, 0x138: 100, 0x147: 102, 0x148: 103, 0x149: 104,
    0x14B: 105, 0x14D: 106, 0x14F: 107, 0x150: 108, 0x151: 109, 0x152: 110, 0x153: 111,
    0x15B: 125, 0x15C: 126, 0x15D: 127, 0x145: 119,
}
EVDEV_OFFSET = 8
KEY_PRESS, KEY_RELEASE, BUTTON_PRESS, BUTTON_RELEASE, MOTION_NOTIFY = 2, 3, 4, 5, 6  # X core events
BUTTON_BITS = ((1, 1), (2, 2), (4, 3), (8, 4), (16, 5), (32, 8), (64, 9))  # mask bit -> X button


class X11Error(RuntimeError):
    """The X display cannot be served (unreachable, or missing extensions)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmdt.argtypes = [ctypes.c_void_p]


class ShmSegment:
    """A SysV segment attached here and in the X server; freed when both let go."""

    def __init__(self, conn, shm, size: int, checked: bool = True):
        """`checked`: wait for the X server's answer to the attach (an error raises here);
        unchecked, an error comes as an event, and the first capture into it fails."""
        self.size = size
        self.shmid = _libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600)
        if self.shmid < 0:
            raise X11Error(f"shmget failed: errno {ctypes.get_errno()}")
        self.addr = _libc.shmat(self.shmid, None, 0)
        self.seg = conn.generate_id()
        try:
            if checked:
                shm.AttachChecked(self.seg, self.shmid, False).check()
            else:
                shm.Attach(self.seg, self.shmid, False)
        except BaseException:
            _libc.shmdt(ctypes.c_void_p(self.addr))
            raise
        finally:
            # Marked for removal now: the kernel frees it once we and the X server detach,
            # even if this process dies.
            _libc.shmctl(self.shmid, IPC_RMID, None)
        self.array = np.frombuffer((ctypes.c_ubyte * size).from_address(self.addr), np.uint8)

    def close(self, shm) -> None:
        try:
            shm.Detach(self.seg)
        except Exception:  # the X server is gone: nothing there to detach from
            pass
        self.array = None
        _libc.shmdt(ctypes.c_void_p(self.addr))


def damaged_rows(rects: list | None, height: int) -> list[tuple[int, int]]:
    """The row bands [top, bottom) that `rects` (x, y, w, h) touch, merged; None: all rows."""
    if rects is None:
        return [(0, height)]
    spans = sorted((max(0, y), min(height, y + h)) for _x, y, _w, h in rects if h > 0)
    bands: list[tuple[int, int]] = []
    for top, bottom in spans:
        if top >= bottom:
            continue
        if bands and top <= bands[-1][1]:
            bands[-1] = (bands[-1][0], max(bands[-1][1], bottom))
        else:
            bands.append((top, bottom))
    return bands


class X11Source:
    def __init__(self, display_name: str, server, view_only: bool = False, fps: float = 30.0):
        import xcffib
        import xcffib.damage
        import xcffib.randr
        import xcffib.shm
        import xcffib.xfixes
        import xcffib.xproto
        import xcffib.xtest

        self.xcffib = xcffib
        try:
            self.conn = xcffib.connect(display=display_name)
        except Exception as exc:
            raise X11Error(f"cannot connect to X display {display_name}: {exc}") from None
        extensions = {name: self.conn.core.QueryExtension(len(name), name).reply()
                      for name in REQUIRED_EXTENSIONS}
        missing = [name for name, reply in extensions.items() if not reply.present]
        if missing:
            self.conn.disconnect()
            raise X11Error(f"X display {display_name} lacks the extension(s) {', '.join(missing)}")
        self.server, self.display, self.fps = server, server.display, fps
        self.screen = self.conn.get_setup().roots[0]
        self.root = self.screen.root
        self.shm = self.conn(xcffib.shm.key)
        self.damage_ext = self.conn(xcffib.damage.key)
        self.xfixes = self.conn(xcffib.xfixes.key)
        self.xtest = self.conn(xcffib.xtest.key)
        self.randr = self.conn(xcffib.randr.key)
        self.damage_ext.QueryVersion(1, 1).reply()
        self.xfixes.QueryVersion(4, 0).reply()
        self.randr.QueryVersion(1, 2).reply()
        # The event codes the capture driver reads raw (xcb.py): DamageNotify, RandR's
        # ScreenChangeNotify (each its extension's first), XFIXES' CursorNotify (its second).
        self.event_codes = (extensions["DAMAGE"].first_event, extensions["RANDR"].first_event,
                            extensions["XFIXES"].first_event + 1)
        try:
            self.xcb = RawXcb(self.conn)
        except OSError as exc:
            self.conn.disconnect()
            raise X11Error(f"cannot load libxcb for capture: {exc}") from None
        self.lock = threading.Lock()  # requests come from the capture and the server threads
        self.segments: list[ShmSegment] = []
        self._in_flight: tuple | None = None  # the capture whose replies are awaited
        self._driver: CaptureDriver | None = None
        self.width = self.height = 0
        self.frames_captured = 0  # all sizes: the fresh-pages hint's frame count
        self.buttons = 0
        self._allocate(self.screen.width_in_pixels, self.screen.height_in_pixels)
        self.damage_id = self.conn.generate_id()
        self.damage_ext.Create(self.damage_id, self.root, xcffib.damage.ReportLevel.RawRectangles)
        self.xfixes.SelectCursorInput(self.root, xcffib.xfixes.CursorNotifyMask.DisplayCursor)
        self.randr.SelectInput(self.root, xcffib.randr.NotifyMask.ScreenChange)
        self.conn.flush()
        self.keycodes = self._keycode_range()
        self.pages_hint = FreshPagesHint(display_name, self.conn.get_file_descriptor(), time.monotonic())
        self.resizer = X11Resizer(display_name)
        # What X applications copy reaches the clients; what clients copy, X applications
        # (unless view-only: that is input).
        self.clipboard = X11ClipboardBridge(display_name, server, server.max_clipboard)
        if not view_only:
            server.on_key, server.on_pointer = self.key, self.pointer
            # A client's window size becomes the screen's, where the X server allows it.
            server.on_resize = self.resizer.resize
            server.on_clipboard = self.clipboard.offer
        self.update_cursor()

    # -- capture ---------------------------------------------------------------------------------
    def _allocate(self, width: int, height: int, wait: bool = True) -> None:
        """Segments for a width x height screen; the old ones stay if these cannot be made.
        Without `wait`, their attach requests are not waited for (ShmSegment's `checked`)."""
        segments: list[ShmSegment] = []
        try:
            for _ in range(RING):
                segments.append(ShmSegment(self.conn, self.shm, width * height * 4, checked=wait))
        except BaseException:
            for seg in segments:
                seg.close(self.shm)
            raise
        for seg in self.segments:
            seg.close(self.shm)
        self.width, self.height = width, height
        self.segments = segments
        self._stale: list[list | None] = [None] * RING  # per segment: damage since written; None: all
        self._next = 0
        self.rows_captured = 0  # rows read from the X server, for tests and benchmarks
        self.display.resize(width, height)

    @property
    def capturing(self) -> bool:
        """A capture waits for the X server's replies (finish_capture)."""
        return self._in_flight is not None

    def begin_capture(self, damage) -> None:
        """Ask the X server for the next ring segment brought up to date with `damage` (rects;
        None: everything changed); the frame is published by finish_capture once the
        replies are in. One capture at a time."""
        assert self._in_flight is None, "a capture is already in flight"
        for i in range(RING):  # every segment misses this damage until it is next written
            if self._stale[i] is not None:
                self._stale[i] = None if damage is None else self._stale[i] + damage
        index = self._next
        self._next = (index + 1) % RING
        seg = self.segments[index]
        bands = damaged_rows(self._stale[index], self.height)
        rows = sum(b - a for a, b in bands)
        if rows > FULL_CAPTURE_SHARE * self.height:
            bands, rows = [(0, self.height)], self.height
        with self.lock:
            sequences = self.xcb.request_images(self.root, seg.seg, self.width, bands, self.width * 4)
        self._stale[index] = []
        self._in_flight = (index, damage, rows, sequences, [])

    def finish_capture(self, wait: bool = False) -> bool:
        """Publish the capture in flight if its replies are in (all of them, with `wait`).
        True when nothing is left in flight. XcbError if the X server refused a request."""
        flight = self._in_flight
        if flight is None:
            return True
        index, damage, rows, sequences, errors = flight
        with self.lock:
            if wait:
                self.xcb.wait_replies(sequences, errors)
            elif not self.xcb.poll_replies(sequences, errors):
                return False
        self._in_flight = None
        if errors:
            self._stale[index] = None  # not written after all
            raise XcbError(errors[0])
        self.rows_captured += rows
        self.frames_captured += 1
        self.display.update(self.segments[index].array.reshape(self.height, self.width, 4), damage)
        return True

    def capture(self, damage) -> None:
        """Publish the screen with `damage` (rects) changed, None: everything; waits for the X
        server."""
        self.begin_capture(damage)
        self.finish_capture(wait=True)

    def run(self, stop: threading.Event) -> None:
        """Capture each change as the X server reports it, on the server's event loop
        (x11drive.CaptureDriver), until `stop` is set. X11Error if the X server goes away
        (`stop` is then set too) or the server is not serving."""
        loop = self.server.loop
        if loop is None:
            raise X11Error("the server is not serving: start it before the X11 source runs")
        if self._driver is not None:
            raise RuntimeError("the X11 source is already running")
        driver = CaptureDriver(self, loop, stop)
        self._driver = driver
        try:
            loop.call_soon_threadsafe(driver.start)
        except RuntimeError:  # the loop closed meanwhile
            self._driver = None
            raise X11Error("the server stopped serving") from None
        try:
            # A server that stops (or starts again, on a new loop) first ends this with an error.
            while not stop.wait(SERVER_CHECK_S):
                if loop.is_closed() or self.server.loop is not loop:
                    raise X11Error("the server stopped serving")
        finally:
            driver.stop_and_wait()
            self._driver = None
        if driver.lost is not None:
            raise X11Error(driver.lost)

    def begin_changes(self, damage: list, resized: tuple[int, int] | None, wait: bool = True) -> None:
        """begin_capture for what the events since the last capture said changed: a new
        screen size is captured whole (without `wait`, its new segments are attached without
        waiting for the X server)."""
        if resized and resized != (self.width, self.height):
            with self.lock:
                self._allocate(*resized, wait=wait)
            self.begin_capture(None)
        elif damage:
            self.begin_capture(damage)

    def capture_changes(self, damage: list, resized: tuple[int, int] | None) -> None:
        """Capture what the events since the last capture said changed; waits for the X server."""
        try:
            self.begin_changes(damage, resized)
            self.finish_capture(wait=True)
        except (self.xcffib.ConnectionException, XcbConnectionLost):
            raise
        except (self.xcffib.XcffibException, XcbError) as exc:
            self.follow_screen(exc)

    def follow_screen(self, error) -> None:
        """A capture failed (`error`): the screen changed size between its damage and its
        ScreenChangeNotify, so a capture of the old size does not fit (BadMatch). Take the
        size it has now, whole."""
        geometry = self.conn.core.GetGeometry(self.root).reply()
        size = (geometry.width, geometry.height)
        if size == (self.width, self.height):
            log.warning("capture failed (%s) at an unchanged size %dx%d", type(error).__name__, *size)
            return
        with self.lock:
            self._allocate(*size)
        try:
            self.capture(None)
        except XcbError as exc:  # it changed again meanwhile: its next ScreenChangeNotify follows
            log.info("capture at the new size %dx%d failed too (%s)", *size, exc)

    # -- cursor ------------------------------------------------------------------------------------
    def update_cursor(self) -> None:
        """Fetch the cursor's image and show it, waiting for the X server (at start; the
        capture driver asks without waiting)."""
        try:
            with self.lock:
                image = self.xfixes.GetCursorImage().reply()
        except self.xcffib.Error as exc:  # e.g. BadAccess for a cursor whose owner is gone
            log.debug("cursor image unavailable: %s", type(exc).__name__)
            return
        argb = np.array(image.cursor_image, dtype=np.uint32).tobytes()
        self.show_cursor(image.width, image.height, image.xhot, image.yhot, argb)

    def show_cursor(self, w: int, h: int, xhot: int, yhot: int, argb: bytes) -> None:
        """Send XFIXES' cursor image (w x h premultiplied ARGB, native order) to the clients."""
        if not w or not h:
            return
        pixels = np.frombuffer(argb, np.uint8).reshape(h, w, 4).astype(np.uint16)  # B, G, R, A (premultiplied)
        alpha = pixels[..., 3:4]
        # XFIXES gives premultiplied alpha; SPICE ALPHA cursors are straight.
        straight = np.where(alpha > 0, np.minimum(255, pixels[..., :3] * 255 // np.maximum(alpha, 1)), 0)
        out = np.concatenate([straight, alpha], axis=2).astype(np.uint8)
        self.server.set_cursor(out, xhot, yhot)

    # -- input -------------------------------------------------------------------------------------
    def _keycode_range(self) -> range:
        setup = self.conn.get_setup()
        return range(setup.min_keycode, setup.max_keycode + 1)

    def keycode(self, scancode: int) -> int | None:
        linux = EXTENDED_TO_LINUX.get(scancode) if scancode & 0x100 else scancode
        if linux is None:
            return None
        code = linux + EVDEV_OFFSET
        return code if code in self.keycodes else None

    def key(self, scancode: int, pressed: bool) -> None:
        code = self.keycode(scancode)
        if code is None:
            log.debug("no X keycode for scancode 0x%x", scancode)
            return
        kind = KEY_PRESS if pressed else KEY_RELEASE
        with self.lock:
            self.xtest.FakeInput(kind, code, 0, self.root, 0, 0, 0)
            self.conn.flush()
        self._poke()

    def pointer(self, x: int, y: int, buttons: int) -> None:
        with self.lock:
            self.xtest.FakeInput(MOTION_NOTIFY, 0, 0, self.root, x, y, 0)
            changed = buttons ^ self.buttons
            for bit, button in BUTTON_BITS:
                if changed & bit:
                    kind = BUTTON_PRESS if buttons & bit else BUTTON_RELEASE
                    self.xtest.FakeInput(kind, button, 0, self.root, 0, 0, 0)
            self.buttons = buttons
            self.conn.flush()
        self._poke()

    def _poke(self) -> None:
        # A flush may read the X server's events into libxcb's queue: the driver looks there.
        driver = self._driver
        if driver is not None:
            driver.poke()

    def close(self) -> None:
        driver = self._driver
        if driver is not None and not driver.stop_and_wait():
            # The loop did not let go of the connection: freeing it under the loop would be
            # worse than leaving it to the process's exit.
            log.warning("the X11 capture did not stop; its X connection is left open")
            return
        server = self.server
        if server.on_clipboard == self.clipboard.offer:  # nothing reaches a closed bridge
            server.on_clipboard = None
        if server.on_resize == self.resizer.resize:
            server.on_resize = None
        for part in (self.resizer, self.clipboard):
            try:
                part.close()
            except Exception as exc:  # a dead X server: close what we can
                log.debug("closing %s: %s", type(part).__name__, exc)
        with self.lock:
            for seg in self.segments:
                seg.close(self.shm)
            self.segments = []
            self.xcb.close()
            try:
                self.conn.disconnect()
            except Exception:
                pass
