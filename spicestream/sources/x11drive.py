"""When the X11 source captures: on the server's event loop, as the X server reports changes.

The loop that sends the frames also watches the X connection's socket. It reads the DAMAGE,
RandR and XFIXES events, asks for the damaged rows (x11.py, begin_capture) without waiting,
and publishes the frame when the replies are in; the display's wake-up then finds the loop
already running, with no self-pipe to write. With a capture thread of its own, a frame cost a
wake-up and a GIL hand-off on each side: that thread and the server's took 1.71 and 1.71 ms a
frame, the server's alone 1.47 and 1.33 here (bench/glass_x11.py, MJPEG, 2 alternated pairs;
the README has the figures).

Nothing here waits on the X server: a cursor change's GetCursorImage is collected the same
way, a new screen size's shared-memory segments are attached without waiting for the answer,
and a capture that failed because the size changed under it is followed by the RandR event
that says so, not by asking for the size.
"""

from __future__ import annotations

import logging
import threading
import time

from .xcb import DAMAGE_AREA, DAMAGE_AREA_AT, SCREEN_SIZE, SCREEN_SIZE_AT, XcbConnectionLost, XcbError

log = logging.getLogger("spicestream.x11")

STOP_WAIT_S = 5.0
# A capture whose replies the socket has not announced is looked at again after this: a
# request made on the connection elsewhere may have read them into libxcb's queue.
RECHECK_S = 0.1
EVENTS_PER_SERVICE = 256  # then the loop's other work has a turn
MAX_DAMAGE_RECTS = 64  # beyond this many, the damage is their bounding box


class CapturePacer:
    """At most `fps` captures a second on average, with a burst of two: a draw that comes a
    little early (a producer's jitter) is still captured at once, not merged with the next."""

    BURST = 2.0

    def __init__(self, fps: float):
        self.period = 1.0 / fps
        self.tokens = self.BURST
        self.at: float | None = None

    def _refill(self, now: float) -> None:
        if self.at is not None:
            self.tokens = min(self.BURST, self.tokens + (now - self.at) / self.period)
        self.at = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next capture (0: capture now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) * self.period

    def captured(self, now: float) -> None:
        self._refill(now)
        self.tokens = max(0.0, self.tokens - 1.0)


class CaptureDriver:
    """Drives an X11Source from `loop`: start() there, stop_and_wait() from another thread.
    Each change is captured as soon as the X server reports it, at most `fps` a second
    (CapturePacer): waiting for the next tick of a fixed clock would add up to a tick of
    latency and merge two draws that fall in one tick. If the X connection breaks, `lost`
    says why and `stop` is set."""

    def __init__(self, source, loop, stop: threading.Event):
        self.source, self.loop, self.stop = source, loop, stop
        self.fd = source.conn.get_file_descriptor()
        self.pacer = CapturePacer(source.fps)
        self.damage: list = []
        self.resized: tuple[int, int] | None = None
        self.whole = True  # the first frame is captured whole
        self.timer = None  # the pacer's wait
        self.recheck = None  # the look at a capture in flight (RECHECK_S)
        self.cursor_wanted = False  # the cursor changed: fetch its image
        self.cursor_request: int | None = None  # the GetCursorImage in flight
        self._budget = EVENTS_PER_SERVICE
        self.lost: str | None = None
        self.running = False
        self.loop_thread: int | None = None
        self._stopped = threading.Event()

    # -- lifecycle (start and _halt on the loop) -----------------------------------------------
    def start(self) -> None:
        if self.stop.is_set():
            self._stopped.set()
            return
        self.running, self.loop_thread = True, threading.get_ident()
        self.loop.add_reader(self.fd, self.service)
        self.service()

    def stop_and_wait(self) -> bool:
        """Stop watching the X connection (from another thread than the loop's). True once
        the loop has let go of it; False if it did not within STOP_WAIT_S."""
        if self._stopped.is_set():
            return True
        try:
            self.loop.call_soon_threadsafe(self._halt)
        except RuntimeError:  # the loop is closed: nothing of ours runs on it any more
            return True
        if self._stopped.wait(STOP_WAIT_S):
            return True
        if self.loop.is_closed():
            return True
        log.warning("the server's loop did not stop the X11 capture in %.0f s", STOP_WAIT_S)
        return False

    def _halt(self) -> None:
        if self.running:
            self.running = False
            self.loop.remove_reader(self.fd)
            for timer in (self.timer, self.recheck):
                if timer is not None:
                    timer.cancel()
            self.timer = self.recheck = None
        self._stopped.set()

    def poke(self) -> None:
        """Look at the connection soon: a request made elsewhere (input) may have read events
        into libxcb's queue, where the socket no longer signals them."""
        if not self.running:
            return
        if threading.get_ident() == self.loop_thread:
            self.loop.call_soon(self.service)
        else:
            try:
                self.loop.call_soon_threadsafe(self.service)
            except RuntimeError:
                pass

    # -- work --------------------------------------------------------------------------------
    def service(self) -> None:
        """Take what the X server sent and move the capture on, until nothing is left to do
        before the X server or the pacer answers."""
        if not self.running:
            return
        self._budget = EVENTS_PER_SERVICE
        server = self.source.server
        server.hold_wakes()  # a frame published here is sent when this is done, not a turn later
        try:
            while self._read_events() or self._advance():
                pass
            if self._budget <= 0:  # a flood of events: the rest after the loop's other work
                self.loop.call_soon(self.service)
            elif (self.source.capturing or self.cursor_request is not None) and self.recheck is None:
                self.recheck = self.loop.call_later(RECHECK_S, self._rechecked)
        except (XcbConnectionLost, self.source.xcffib.ConnectionException) as exc:
            self._give_up(f"the X server has exited ({exc})")
        except Exception as exc:  # a bug of ours: said once, not at every event that follows
            log.exception("X11 capture failed")
            self._give_up(f"capture failed: {exc!r}")
        finally:
            server.release_wakes()  # the pump's own errors are the loop's to report, not ours

    def _give_up(self, why: str) -> None:
        self.lost = why
        self._halt()
        self.stop.set()

    def _paced(self) -> None:
        self.timer = None
        self.service()

    def _rechecked(self) -> None:
        self.recheck = None
        self.service()

    def _read_events(self) -> bool:
        """Take the queued X events (reading the socket); True if there were any."""
        source = self.source
        poll = source.xcb.poll_event
        damage_event, screen_event, cursor_event = source.event_codes
        seen = cursor = False
        while self._budget > 0 and (event := poll()) is not None:
            seen = True
            self._budget -= 1
            kind = event[0] & 0x7F  # bit 7: sent by SendEvent, the same event to us
            if kind == damage_event:
                self.damage.append(DAMAGE_AREA.unpack_from(event, DAMAGE_AREA_AT))
            elif kind == screen_event:
                self.resized = SCREEN_SIZE.unpack_from(event, SCREEN_SIZE_AT)
            elif kind == cursor_event:
                cursor = True
            elif kind == 0:  # an error for a request nobody waits on (input, cursor)
                log.debug("X error %d for a request of ours", event[1])
        if len(self.damage) > MAX_DAMAGE_RECTS:
            x0, y0 = min(r[0] for r in self.damage), min(r[1] for r in self.damage)
            x1, y1 = max(r[0] + r[2] for r in self.damage), max(r[1] + r[3] for r in self.damage)
            self.damage = [(x0, y0, x1 - x0, y1 - y0)]
        if cursor:
            self.cursor_wanted = True
        return seen

    def _advance(self) -> bool:
        """Finish the capture in flight, or start the next; True if either happened."""
        source = self.source
        xcffib = source.xcffib
        if self.cursor_request is not None:
            done, image = source.xcb.poll_cursor_image(self.cursor_request)
            if done:
                self.cursor_request = None
                if image is not None:
                    source.show_cursor(*image)
                return True
        elif self.cursor_wanted:
            self.cursor_wanted = False
            with source.lock:
                self.cursor_request = source.xcb.request_cursor_image()
            return True
        try:
            if source.capturing:
                if not source.finish_capture():
                    return False  # its replies are still to come: the socket will say
                if self.recheck is not None:
                    self.recheck.cancel()
                    self.recheck = None
                source.pages_hint.check(time.monotonic(), source.frames_captured)
                return True
            if not (self.damage or self.resized or self.whole) or self.timer is not None:
                return False
            now = time.monotonic()
            delay = self.pacer.delay(now)
            if delay > 0:  # then what else changed meanwhile is captured with it
                self.timer = self.loop.call_later(delay, self._paced)
                return False
            damage, resized, whole = self.damage, self.resized, self.whole
            self.damage, self.resized, self.whole = [], None, False
            self.pacer.captured(now)
            if whole and not (resized and resized != (source.width, source.height)):
                source.begin_capture(None)
            else:  # a new size is captured whole
                source.begin_changes(damage, resized, wait=False)
            return True
        except (xcffib.ConnectionException, XcbConnectionLost):
            raise
        except XcbError as exc:
            # The screen changed size between the damage and the capture (BadMatch). Its
            # RandR ScreenChangeNotify was sent before this error: the next events read bring
            # the new size, captured whole. Asking for the size here would wait on the X server.
            log.info("capture at %dx%d failed (%s): following the screen's next change",
                     source.width, source.height, exc)
            return True
        except xcffib.XcffibException as exc:  # not expected here (segments attach unchecked)
            source.follow_screen(exc)  # the one path that asks the X server and waits
            return True
