"""When a stream starts and ends, decided by the detector alone with an injected clock: the
real-client tests only have to show it end to end."""

from __future__ import annotations

import numpy as np

from spicestream.display.damage import TILE
from spicestream.display.streams import START_HEAT, STOP_AFTER_S, StreamDetector

W, H = 640, 480
ROWS, COLS = -(-H // TILE), -(-W // TILE)


def cells(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Changed tiles covering tile columns x0..x1-1 and rows y0..y1-1."""
    mask = np.zeros((ROWS, COLS), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def video_frame(seed: int = 0) -> np.ndarray:
    frame = np.random.default_rng(seed).integers(0, 256, (H, W, 4), dtype=np.uint8)
    frame[..., 3] = 255
    return frame


def feed(detector: StreamDetector, mask: np.ndarray, fps: float, seconds: float, start: float = 0.0,
         frame: np.ndarray | None = None) -> tuple[float, float | None]:
    """Updates at `fps` from `start` for `seconds`; returns (end time, time a region appeared)."""
    frame = video_frame() if frame is None else frame
    started = None
    t = start
    for i in range(int(seconds * fps)):
        t = start + i / fps
        if detector.damaged(mask, frame, t) and started is None and detector.region is not None:
            started = t
    return t, started


def test_sustained_updates_start_a_stream_within_a_fraction_of_a_second():
    d = StreamDetector("all", W, H)
    t, started = feed(d, cells(3, 2, 7, 5), fps=30, seconds=2)
    assert started is not None and started < 0.5, started  # heat passes START_HEAT after ~4-5 updates
    assert d.region.rect == (3 * TILE, 2 * TILE, 4 * TILE, 3 * TILE)


def test_a_few_updates_a_second_never_start_a_stream():
    d = StreamDetector("all", W, H)
    # 2 updates a second settle near heat 2, under START_HEAT, however long they go on.
    assert START_HEAT > 2.5
    _, started = feed(d, cells(3, 2, 7, 5), fps=2, seconds=60)
    assert started is None and d.region is None


def test_a_stream_ends_exactly_when_its_region_has_been_still_for_the_stop_time():
    d = StreamDetector("all", W, H)
    last, _ = feed(d, cells(3, 2, 7, 5), fps=30, seconds=2)
    assert d.region is not None
    assert d.tick(last + STOP_AFTER_S * 0.99) is False and d.region is not None
    assert d.tick(last + STOP_AFTER_S) is True and d.region is None
    # Occasional changes elsewhere (a clock ticking) do not keep it alive.
    d2 = StreamDetector("all", W, H)
    last, _ = feed(d2, cells(3, 2, 7, 5), fps=30, seconds=2)
    region = d2.region
    for i in range(1, 3):
        d2.damaged(cells(0, 0, 1, 1), video_frame(), last + i * 0.45)
        assert d2.region is region
    assert d2.tick(last + STOP_AFTER_S) is True and d2.region is None


def test_a_full_screen_change_streams_the_whole_surface_and_a_wider_area_replaces_the_region():
    d = StreamDetector("all", W, H)
    feed(d, cells(0, 0, COLS, ROWS - 1), fps=30, seconds=1)
    assert d.region.rect == (0, 0, W, H)
    d = StreamDetector("all", W, H)
    t, _ = feed(d, cells(2, 2, 4, 4), fps=30, seconds=1)
    first = d.region
    t, _ = feed(d, cells(2, 2, 8, 6), fps=30, seconds=1, start=t + 0.033)
    assert d.region is not first and d.region.rect == (2 * TILE, 2 * TILE, 6 * TILE, 4 * TILE)
    # A hot area inside the current region keeps it: no restart for every wobble.
    current = d.region
    feed(d, cells(3, 3, 5, 5), fps=30, seconds=1, start=t + 0.033)
    assert d.region is current


def test_filter_mode_streams_colourful_areas_only_and_off_never_streams():
    flat = np.zeros((H, W, 4), np.uint8)
    flat[..., :3] = (200, 200, 200)
    d = StreamDetector("filter", W, H)
    _, started = feed(d, cells(3, 2, 7, 5), fps=30, seconds=3, frame=flat)  # a ticking clock
    assert started is None
    _, started = feed(d, cells(3, 2, 7, 5), fps=30, seconds=1, start=3.0)  # video
    assert started is not None
    off = StreamDetector("off", W, H)
    _, started = feed(off, cells(0, 0, COLS, ROWS), fps=60, seconds=3)
    assert started is None and off.region is None


class AlwaysEvaluating(StreamDetector):
    """The detector without its shortcut for damage inside a settled region."""

    @property
    def _settled(self) -> bool:
        return False

    @_settled.setter
    def _settled(self, value: bool) -> None:
        pass


def test_the_shortcut_for_damage_inside_the_region_decides_as_a_full_evaluation_does():
    rng = np.random.default_rng(7)
    for mode in ("all", "filter"):
        fast, full = StreamDetector(mode, W, H), AlwaysEvaluating(mode, W, H)
        frame = video_frame()
        t = 0.0
        for step in range(3000):
            t += rng.choice([1 / 60, 1 / 30, 0.3])
            if rng.random() < 0.8:  # mostly one moving area, sometimes anywhere
                x, y = 2 + step // 400, 1 + step // 600
                mask = cells(x, y, x + 3, y + 2)
            else:
                x0, y0 = rng.integers(0, COLS), rng.integers(0, ROWS)
                mask = cells(x0, y0, x0 + rng.integers(1, 4), y0 + rng.integers(1, 3))
            changed = fast.damaged(mask, frame, t)
            assert changed == full.damaged(mask, frame, t), step
            assert (fast.region and fast.region.rect) == (full.region and full.region.rect), step
            if step % 50 == 0:
                assert fast.tick(t) == full.tick(t), step
        assert fast._settled  # the shortcut was taken
