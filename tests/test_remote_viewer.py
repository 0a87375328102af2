"""End to end with the real client: remote-viewer (spice-gtk) under Xvfb, driven by xdotool.

The application is a `spicestream.Server` in this process. It draws a 4x4 grid of distinct
saturated colours; the tests find every cell in screenshots of the X screen (wherever and at
whatever scale remote-viewer puts the display), then check updates, input and passwords.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

import spicestream

try:  # tests/ may or may not be a package
    from . import xclient
except ImportError:
    import xclient

_missing = xclient.missing_tools()
if _missing:
    pytest.skip(f"needs {', '.join(_missing)} (remote-viewer under Xvfb)", allow_module_level=True)

pytestmark = [pytest.mark.realclient, pytest.mark.timeout(60)]

W, H = 640, 480
ROWS = COLS = 4
CELL_W, CELL_H = W // COLS, H // ROWS
TOL = 8  # per channel, screenshot vs. drawn colour
SHOW_TIMEOUT = 20.0

# RGB; every colour has a 255 channel and differs from every other by >= 127 in some channel,
# and none is grey, so neither each other nor the viewer's grey/white chrome is confused.
GRID = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
    (255, 0, 255), (0, 255, 255), (255, 128, 0), (255, 0, 128),
    (128, 255, 0), (0, 255, 128), (128, 0, 255), (0, 128, 255),
    (255, 255, 128), (255, 128, 255), (128, 255, 255), (255, 128, 128),
]
SPARE = [(128, 255, 128), (128, 128, 255)]  # colours for updates, not in the grid


def cell_rect(row: int, col: int) -> tuple[int, int, int, int]:
    return col * CELL_W, row * CELL_H, CELL_W, CELL_H


def paint(colours: list[tuple[int, int, int]]) -> np.ndarray:
    """A new BGRx frame with the grid in `colours` (row-major)."""
    frame = np.zeros((H, W, 4), np.uint8)
    frame[..., 3] = 255
    for i, (r, g, b) in enumerate(colours):
        x, y, w, h = cell_rect(*divmod(i, COLS))
        frame[y : y + h, x : x + w, :3] = (b, g, r)  # byte0 blue, byte1 green, byte2 red
    return frame


# -- finding the picture in a screenshot ------------------------------------------------------

@dataclass
class Blob:
    count: int
    x0: int
    y0: int
    x1: int  # inclusive
    y1: int
    cx: float
    cy: float

    @property
    def fill(self) -> float:
        return self.count / ((self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1))


def find_blob(shot16: np.ndarray, rgb, tol: int = TOL) -> Blob | None:
    """Pixels of colour `rgb` (+-tol), eroded by one pixel so that the thin seams a scaled
    picture blends between two cells (red|magenta makes pink...) are not counted; the box is
    grown back by that pixel."""
    mask = (np.abs(shot16 - np.array(rgb, np.int16)) <= tol).all(axis=2)
    core = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    ys, xs = np.nonzero(core)
    if len(xs) == 0:
        return None
    xs, ys = xs + 1, ys + 1  # core[i, j] is mask[i + 1, j + 1]
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    return Blob(int(mask[y0 - 1 : y1 + 2, x0 - 1 : x1 + 2].sum()), x0 - 1, y0 - 1, x1 + 1, y1 + 1,
                float(xs.mean()), float(ys.mean()))


class NotFound(Exception):
    pass


@dataclass
class Placement:
    """Where the surface is on the screen: screen = left + surface * scale."""
    left: float
    top: float
    sx: float
    sy: float
    blobs: list[Blob]

    def to_screen(self, x: float, y: float) -> tuple[int, int]:
        return round(self.left + x * self.sx), round(self.top + y * self.sy)

    def to_surface(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.left) / self.sx, (y - self.top) / self.sy

    def screen_rect(self, x: int, y: int, w: int, h: int, margin: int = 0):
        """(x0, y0, x1, y1) exclusive, on the screen, grown by `margin` pixels."""
        x0, y0 = self.to_screen(x, y)
        x1, y1 = self.to_screen(x + w, y + h)
        return x0 - margin, y0 - margin, x1 + margin, y1 + margin


def locate(shot: np.ndarray, colours=GRID) -> Placement:
    """Find the grid: one solid blob per colour, laid out in grid order. Raises NotFound."""
    shot16 = shot.astype(np.int16)
    blobs = []
    for i, rgb in enumerate(colours):
        blob = find_blob(shot16, rgb)
        if blob is None or blob.count < 400:
            raise NotFound(f"cell {divmod(i, COLS)} colour {rgb} not on screen")
        if blob.fill < 0.97:  # not one solid rectangle: half drawn, or stray pixels elsewhere
            raise NotFound(f"cell {divmod(i, COLS)} colour {rgb} is not a solid rectangle: {blob}")
        blobs.append(blob)
    grid = [blobs[r * COLS : (r + 1) * COLS] for r in range(ROWS)]
    for r in range(ROWS):
        for c in range(COLS):
            b = grid[r][c]
            if c + 1 < COLS:  # right neighbour: same row band, directly adjacent
                n = grid[r][c + 1]
                if not (abs(n.y0 - b.y0) <= 2 and abs(n.y1 - b.y1) <= 2 and 0 < n.x0 - b.x1 <= 5):
                    raise NotFound(f"cells {(r, c)} and {(r, c + 1)} are not side by side: {b} {n}")
            if r + 1 < ROWS:
                n = grid[r + 1][c]
                if not (abs(n.x0 - b.x0) <= 2 and abs(n.x1 - b.x1) <= 2 and 0 < n.y0 - b.y1 <= 5):
                    raise NotFound(f"cells {(r, c)} and {(r + 1, c)} are not stacked: {b} {n}")
    # Outer edges of the grid -> position and scale (boundary pixels may be blended if scaled).
    left, top = grid[0][0].x0, grid[0][0].y0
    right, bottom = grid[-1][-1].x1 + 1, grid[-1][-1].y1 + 1
    placement = Placement(left, top, (right - left) / W, (bottom - top) / H, blobs)
    if not (0.2 < placement.sx < 4 and abs(placement.sx - placement.sy) < 0.02 * placement.sx):
        raise NotFound(f"implausible scale {placement.sx:.3f} x {placement.sy:.3f}")
    # Sample: the centre of every cell, mapped through the placement, has the cell's colour,
    # as does the blob's own centroid.
    for i, rgb in enumerate(colours):
        x, y, w, h = cell_rect(*divmod(i, COLS))
        px, py = placement.to_screen(x + w / 2, y + h / 2)
        b = blobs[i]
        for sx, sy in ((px, py), (round(b.cx), round(b.cy))):
            got = shot16[sy, sx]
            if (np.abs(got - rgb) > TOL).any():
                raise NotFound(f"cell {divmod(i, COLS)}: pixel ({sx}, {sy}) is {tuple(got)}, want {rgb}")
    return placement


class Screen:
    """Polls screenshots until the picture matches; keeps the last one for failure reports."""

    def __init__(self, x: xclient.XSession, tmp_path):
        self.x, self.tmp_path = x, tmp_path
        self.last: np.ndarray | None = None

    def wait(self, check, timeout: float = SHOW_TIMEOUT, what: str = "the picture"):
        """Poll until `check(shot)` returns a value without raising NotFound; return that."""
        deadline = time.monotonic() + timeout
        reason = "no screenshot taken"
        while True:
            self.last = self.x.screenshot()
            try:
                return check(self.last)
            except NotFound as exc:
                reason = str(exc)
            if time.monotonic() > deadline:
                path = self.tmp_path / "timeout.png"
                self.x.save(self.last, path)
                raise AssertionError(f"{what} did not show within {timeout:.0f} s: {reason} "
                                     f"(last screenshot: {path})")
            time.sleep(0.1)

    def never(self, check, duration: float, what: str) -> None:
        """Fail if `check(shot)` succeeds at any time within `duration` seconds."""
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            self.last = self.x.screenshot()
            try:
                check(self.last)
            except NotFound:
                time.sleep(0.2)
                continue
            self.x.save(self.last, self.tmp_path / "unexpected.png")
            raise AssertionError(f"{what} showed, but should not have")


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def xsession(tmp_path):
    with xclient.XSession(log_dir=tmp_path / "logs") as x:
        yield x


@pytest.fixture
def screen(xsession, tmp_path):
    return Screen(xsession, tmp_path)


def make_app(**kwargs) -> spicestream.Server:
    app = spicestream.Server(port=0, width=W, height=H, **kwargs).start()
    app.display.update(paint(GRID))
    return app


@pytest.fixture
def app():
    server = make_app()
    yield server
    server.stop()


class Recorder:
    """Thread-safe list of callback events (callbacks run on the server's thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple] = []

    def __call__(self, *event) -> None:
        with self.lock:
            self.events.append(event)

    def snapshot(self) -> list[tuple]:
        with self.lock:
            return list(self.events)

    def clear(self) -> None:
        with self.lock:
            self.events.clear()

    def wait(self, predicate, timeout: float = 10.0, what: str = "events"):
        try:
            return xclient.wait_until(lambda: predicate(self.snapshot()), timeout, 0.02, what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; got {self.snapshot()}") from None


# -- tests ------------------------------------------------------------------------------------

def changed_outside(before: np.ndarray, after: np.ndarray, place: Placement, rect) -> np.ndarray:
    """Screen pixels inside the picture but outside `rect` (surface coords, +2 px) that differ."""
    px0, py0, px1, py1 = place.screen_rect(0, 0, W, H)
    cx0, cy0, cx1, cy1 = place.screen_rect(*rect, margin=2)
    diff = (before != after).any(axis=2)
    inside = np.zeros_like(diff)
    inside[py0:py1, px0:px1] = True
    inside[max(cy0, 0):cy1, max(cx0, 0):cx1] = False
    return np.argwhere(diff & inside)


def test_picture_and_updates(app, xsession, screen, tmp_path):
    xsession.start_viewer(f"spice://127.0.0.1:{app.port}")
    place = screen.wait(locate, what="the 4x4 grid")
    before = screen.last
    xsession.save(before, tmp_path / "grid.png")
    if os.environ.get("RV_SCREENSHOT"):  # e.g. RV_SCREENSHOT=/tmp/rv_grid.png, to look at it
        xsession.save(before, os.environ["RV_SCREENSHOT"])
    assert app.sessions == 1

    colours = list(GRID)
    # Each change: (cell, new colour, damage given?). Frames are new arrays every time.
    for (row, col), colour, with_damage in (((1, 2), SPARE[0], True), ((2, 1), SPARE[1], False)):
        index = row * COLS + col
        old = colours[index]
        colours[index] = colour
        frame = paint(colours)
        rect = cell_rect(row, col)
        app.display.update(frame, damage=[rect] if with_damage else None)

        def changed(shot, old=old, colour=colour, index=index):
            shot16 = shot.astype(np.int16)
            gone = find_blob(shot16, old)
            if gone is not None:
                raise NotFound(f"old colour {old} still on screen: {gone}")
            got = locate(shot, colours)  # the new colour where the old cell was, rest intact
            new, was = got.blobs[index], place.blobs[index]
            if max(abs(new.x0 - was.x0), abs(new.y0 - was.y0),
                   abs(new.x1 - was.x1), abs(new.y1 - was.y1)) > 1:
                raise NotFound(f"new colour {colour} at {new}, the cell was at {was}")
            return got

        after_place = screen.wait(changed, what=f"cell {(row, col)} turning {colour} "
                                                f"({'with' if with_damage else 'without'} damage)")
        after = screen.last
        # Only that cell changed on screen: every other blob is where it was, and no pixel of
        # the picture outside the cell differs from the previous screenshot.
        for i, (a, b) in enumerate(zip(place.blobs, after_place.blobs)):
            if i != index:
                assert (a.x0, a.y0, a.x1, a.y1, a.count) == (b.x0, b.y0, b.x1, b.y1, b.count), i
        stray = changed_outside(before, after, place, rect)
        assert len(stray) == 0, f"{len(stray)} pixels changed outside cell {(row, col)}: {stray[:5]}"
        before = after


def test_keys_and_clicks(app, xsession, screen):
    keys, pointer = Recorder(), Recorder()
    app.on_key, app.on_pointer = keys, pointer
    viewer = xsession.start_viewer(f"spice://127.0.0.1:{app.port}")
    place = screen.wait(locate, what="the 4x4 grid")
    window = xsession.find_window(viewer)
    xsession.focus(window)
    # Move into the display first: spice-gtk sends input once the pointer/keyboard is its own.
    xsession.move(*place.to_screen(W / 2 + 10, H / 2 + 10))  # two moves: one is a real motion
    xsession.move(*place.to_screen(W / 2, H / 2))
    pointer.wait(lambda ev: ev, what="pointer motion inside the display")
    keys.clear()

    # A quick tap goes out as one KEY_SCANCODE message: press and release of 'a' (0x1E).
    xsession.key("a")
    keys.wait(lambda ev: len(ev) >= 2, what="key 'a'")
    time.sleep(0.2)  # anything extra would arrive right behind
    assert keys.snapshot() == [(0x1E, True), (0x1E, False)]

    keys.clear()
    xsession.type("a")
    keys.wait(lambda ev: len(ev) >= 2, what="typed 'a'")
    # An extended key (E0 prefix): Right arrow is 0x14D.
    xsession.key("Right")
    keys.wait(lambda ev: len(ev) >= 4, what="key Right")
    # A held key: KEY_DOWN, then KEY_UP separately (not a quick tap).
    xsession.run("xdotool", "keydown", "b")
    keys.wait(lambda ev: len(ev) >= 5, what="key 'b' held down")
    xsession.run("xdotool", "keyup", "b")
    keys.wait(lambda ev: len(ev) >= 6, what="key 'b' released")
    time.sleep(0.2)
    assert keys.snapshot() == [(0x1E, True), (0x1E, False), (0x14D, True), (0x14D, False),
                               (0x30, True), (0x30, False)]

    # Clicks: left, then right, at surface points away from the centre we hovered over.
    for (sx, sy), button, mask in (((437, 311), 1, 1), ((120, 75), 3, 4)):
        pointer.clear()
        xsession.click(*place.to_screen(sx, sy), button=button)
        pointer.wait(lambda ev: any(b == mask for _, _, b in ev) and ev[-1][2] == 0,
                     what=f"button {button} press and release")
        events = pointer.snapshot()
        pressed = next(i for i, e in enumerate(events) if e[2] == mask)
        released = next(i for i, e in enumerate(events) if i > pressed and e[2] == 0)
        tolerance = 1 + 1 / min(place.sx, place.sy)  # one screen pixel, in surface pixels
        for x, y, _ in (events[pressed], events[released]):
            assert 0 <= x < W and 0 <= y < H
            assert abs(x - sx) <= tolerance and abs(y - sy) <= tolerance, (events, (sx, sy))
        assert all(b in (0, mask) for _, _, b in events), events


def write_vv(path, port: int, password: str) -> None:
    path.write_text(f"[virt-viewer]\ntype=spice\nhost=127.0.0.1\nport={port}\npassword={password}\n")


def test_password_connection_file(xsession, screen, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="spicestream")
    app = make_app(password="s3cret")
    try:
        # Wrong password: refused at link time, no session, the picture never shows.
        wrong = tmp_path / "wrong.vv"
        write_vv(wrong, app.port, "not-it")
        viewer = xsession.start_viewer(wrong)
        def refused():
            return any(r.name.startswith("spicestream") and r.levelno >= logging.WARNING
                       and ("password" in r.getMessage() or "PERMISSION_DENIED" in r.getMessage())
                       for r in caplog.records)

        xclient.wait_until(refused, 10, what="the server refusing the wrong password")
        screen.never(locate, 2.0, "the picture, with a wrong password")
        assert app.sessions == 0
        xsession.stop(viewer)  # and its authentication dialog with it

        # Right password: the picture shows.
        right = tmp_path / "right.vv"
        write_vv(right, app.port, "s3cret")
        xsession.start_viewer(right)
        screen.wait(locate, what="the 4x4 grid, with the right password")
        assert app.sessions == 1
    finally:
        app.stop()
