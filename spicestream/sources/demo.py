"""A synthetic, animated desktop used as a frame source when nothing real is attached.

The scene is a static background (gradient, text, panel, window frame) rendered once,
plus two live parts: a "video" window whose content is a plasma pattern, and a
panel clock.  Only those parts are re-rendered and reported as damage.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colours are RGB here; the frame itself is BGRx, converted in one place (_to_bgrx).
_GRAD_TOP = (12, 20, 56)
_GRAD_BOTTOM = (14, 110, 120)
_PANEL = (32, 33, 40)
_TEXT = (235, 238, 245)
_DIM_TEXT = (170, 190, 205)
_TITLE_BAR = (58, 62, 74)
_BORDER = (90, 96, 112)

# The plasma is computed on at most this many columns and upscaled by whole blocks,
# which keeps the per-frame cost nearly independent of the screen size.
_PLASMA_MAX_COLS = 192
FRAME_RING = 4


def _font(size: int) -> ImageFont.ImageFont:
    size = max(10, int(size))  # smaller is unreadable on a remote viewer
    try:  # Pillow >= 10.1 ships a scalable default font.
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _to_bgrx(rgb: np.ndarray) -> np.ndarray:
    out = np.empty(rgb.shape[:2] + (4,), np.uint8)
    out[..., :3] = rgb[..., ::-1]
    out[..., 3] = 255
    return out


def _palette() -> np.ndarray:
    """256-entry BGRx palette: smoothly cycling hues so the plasma looks vivid."""
    i = np.arange(256) / 256.0 * 2 * np.pi
    pal = np.empty((256, 4), np.uint8)
    pal[:, 2] = 128 + 127 * np.sin(i)  # red
    pal[:, 1] = 128 + 127 * np.sin(i + 2 * np.pi / 3)  # green
    pal[:, 0] = 128 + 127 * np.sin(i + 4 * np.pi / 3)  # blue
    pal[:, 3] = 255
    return pal


class DemoScene:
    """An animated scene a person recognises as a desktop."""

    def __init__(self, width: int, height: int, address: str = "spice://127.0.0.1:5900"):
        if width < 32 or height < 32:
            raise ValueError(f"scene too small: {width}x{height}")
        self.width, self.height = w, h = int(width), int(height)
        unit = min(w, h)
        ph = min(max(18, round(h * 0.04)), 64, h // 4)

        # Video content: ~40% of the width, 16:9, sized in whole plasma blocks so
        # the low-resolution pattern upscales exactly with no partial blocks.
        cw = max(16, min(round(w * 0.4), w - 8))
        self._block = s = max(1, -(-cw // _PLASMA_MAX_COLS))
        cols = max(1, cw // s)
        rows = max(1, min(round(cols * 9 / 16), (h - ph - 8) * 3 // 4 // s))
        cw, ch = cols * s, rows * s
        title_h = max(14, round(ph * 0.85))
        # Clamp last so tiny/odd sizes stay in bounds (the frame may then overlap the panel).
        wx = max(0, min(max(round(w * 0.52), 4), w - cw - 4))
        wy = max(0, min(max(ph + (h - ph - title_h - ch) // 2, ph + title_h + 2), h - ch - 2))
        self.video_rect = (wx, wy, cw, ch)

        bg = Image.new("RGB", (w, h))
        t = np.linspace(0.0, 1.0, h)[:, None]
        grad = np.array(_GRAD_TOP) * (1 - t) + np.array(_GRAD_BOTTOM) * t
        bg.paste(Image.fromarray(np.repeat(grad[:, None, :], w, 1).astype(np.uint8)))
        d = ImageDraw.Draw(bg)

        # Desktop text, left of the window (the window is drawn later and wins any overlap).
        tx, ty = round(w * 0.05), ph + round(h * 0.08)
        big, small = _font(unit / 14), _font(unit / 32)
        d.text((tx, ty), "spicestream demo", font=big, fill=_TEXT)
        ty += round(unit / 14 * 1.4)
        d.text((tx, ty), f"{w} x {h}", font=small, fill=_DIM_TEXT)
        hint = _font(unit / 36)
        d.text((tx, h - round(unit / 36 * 2.5)), f"connect with: remote-viewer {address}",
               font=hint, fill=_DIM_TEXT)

        # Top panel with a launcher label; the clock lives at its right end.
        d.rectangle((0, 0, w - 1, ph - 1), fill=_PANEL)
        self._clock_font = pf = _font(ph * 0.6)
        d.text((ph // 2, ph // 2), "Activities", font=pf, fill=_TEXT, anchor="lm")

        # Window frame: border, title bar with title and fake buttons.
        d.rectangle((wx - 2, wy - title_h - 2, wx + cw + 1, wy + ch + 1), fill=_BORDER)
        d.rectangle((wx, wy - title_h, wx + cw - 1, wy - 1), fill=_TITLE_BAR)
        d.text((wx + cw // 2, wy - title_h // 2), "video", font=pf, fill=_TEXT, anchor="mm")
        r = max(2, title_h // 4)
        for k, col in enumerate(((237, 95, 90), (245, 190, 80), (98, 197, 85))):
            cx = wx + title_h // 2 + k * (3 * r)
            d.ellipse((cx - r, wy - title_h // 2 - r, cx + r, wy - title_h // 2 + r), fill=col)

        # Clock rect: fixed size (widest text) so damage stays put as digits change.
        left, _, right, _ = d.textbbox((0, 0), "88:88:88", font=pf)
        clk_w = min(right - left + ph // 2, w)
        self.clock_rect = (w - clk_w, 0, clk_w, ph)

        self._background = _to_bgrx(np.asarray(bg))
        # A ring of frames: the server reads a published frame later (encoders hold up to two
        # in flight), so the next frames are drawn into other buffers, never into one in use.
        self._frames = [self._background.copy() for _ in range(FRAME_RING)]
        self._frame_clock = [None] * FRAME_RING  # clock text drawn in each buffer
        self._next = 0
        self._clock_text = None
        self._wall_offset = None
        self._pal = _palette()
        # Normalised low-res coordinates; kept separable (row/column vectors) so most
        # sine terms cost one small 1-D evaluation and a broadcast add.
        self._xs = np.linspace(0.0, 16 / 9 * 3, cols, dtype=np.float32)[None, :]
        self._ys = np.linspace(0.0, 3.0, rows, dtype=np.float32)[:, None]
        # Content area split into block rows (splitting an axis of a slice is always a
        # view, so writes land in the frame).  Upscaling = repeat columns into one
        # contiguous row, then broadcast it down s lines: ~15x faster than a 2-D
        # block broadcast, whose innermost runs are only s pixels long.
        self._block_rows = [f[wy:wy + ch, wx:wx + cw].reshape(rows, s, cw, 4) for f in self._frames]

    def _plasma(self, t: float) -> np.ndarray:
        x, y = self._xs, self._ys
        v = np.sin(x * 2.1 + t) + np.sin(y * 2.7 - t * 1.3)
        v = v + np.sin((x + y) * 1.7 + t * 0.7)
        cx, cy = 2.6 + 1.8 * math.sin(t * 0.5), 1.5 + 1.2 * math.cos(t * 0.37)
        v += np.sin(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) * 3.5 - t * 2.0)
        # v is in [-4, 4]; spin the palette over time so colours flow too.
        idx = ((v + 4.0) * 32.0 + t * 40.0).astype(np.int32) & 255
        low = self._pal[idx]
        # A bright ball bouncing across, so motion is obvious even in a still frame pair.
        bx = (0.5 + 0.4 * math.sin(t * 1.1)) * x[0, -1]
        by = (0.5 + 0.4 * math.cos(t * 1.7)) * y[-1, 0]
        low[((x - bx) ** 2 + (y - by) ** 2) < 0.09] = (255, 255, 255, 255)
        return low

    def _draw_clock(self, frame: np.ndarray, text: str) -> None:
        x, y, cw, ch = self.clock_rect
        # Start from the background so the previous digits are erased.
        img = Image.fromarray(np.ascontiguousarray(self._background[y:y + ch, x:x + cw, 2::-1]))
        ImageDraw.Draw(img).text((cw // 2, ch // 2), text, font=self._clock_font, fill=_TEXT,
                                 anchor="mm")
        frame[y:y + ch, x:x + cw, :3] = np.asarray(img)[..., ::-1]

    def render(self, now: float) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """Return (frame, damage): a (h, w, 4) uint8 BGRx frame (one of a ring of FRAME_RING,
        reused every FRAME_RING calls) and the (x, y, w, h) rects changed since the
        previous call."""
        first = self._wall_offset is None
        if first:
            # Clock follows `now` (monotonic) but shows local wall time.
            self._wall_offset = time.time() - now
        index, self._next = self._next, (self._next + 1) % FRAME_RING
        frame = self._frames[index]
        damage = [self.video_rect]
        self._block_rows[index][:] = np.repeat(self._plasma(now), self._block, axis=1)[:, None]
        text = time.strftime("%H:%M:%S", time.localtime(now + self._wall_offset))
        if text != self._frame_clock[index]:
            self._frame_clock[index] = text
            self._draw_clock(frame, text)
        if text != self._clock_text:
            self._clock_text = text
            damage.append(self.clock_rect)
        if first:
            damage = [(0, 0, self.width, self.height)]
        return frame, damage


MIN_SIZE, MAX_SIZE = 64, 4096  # what a client may ask the demo to become


class DemoResize:
    """A client's wish for another size (server.on_resize, on the server thread), taken by
    the demo's loop at its next frame. Only the newest wish counts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._wanted: tuple[int, int] | None = None

    def request(self, width: int, height: int) -> None:
        width = max(MIN_SIZE, min(MAX_SIZE, int(width))) & ~1  # even: the video encoders' need
        height = max(MIN_SIZE, min(MAX_SIZE, int(height))) & ~1
        with self._lock:
            self._wanted = (width, height)

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            wanted, self._wanted = self._wanted, None
        return wanted


def run_demo(display, fps: float, size: tuple[int, int], stop_event: threading.Event,
             address: str = "spice://127.0.0.1:5900", resize: DemoResize | None = None) -> None:
    """Resize `display` to `size`, then push a scene frame every 1/fps s until stop_event;
    with `resize`, follow the size clients ask for."""
    w, h = size
    display.resize(w, h)
    scene = DemoScene(w, h, address)
    period = 1.0 / max(float(fps), 0.1)
    next_tick = time.monotonic()
    while not stop_event.is_set():
        wanted = resize.take() if resize is not None else None
        if wanted is not None and wanted != (scene.width, scene.height):
            display.resize(*wanted)
            scene = DemoScene(*wanted, address)
        frame, damage = scene.render(time.monotonic())
        display.update(frame, damage)
        next_tick += period
        now = time.monotonic()
        if now > next_tick:
            # Late: drop the missed ticks instead of bursting to catch up.
            next_tick += math.ceil((now - next_tick) / period) * period
        # wait() doubles as an interruptible sleep.
        stop_event.wait(next_tick - now)
