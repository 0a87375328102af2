"""How many frames a second the application publishes: what a new stream's encoder is told
(x264's caps and buffer durations, the rate controller's per-frame budget, MJPEG quality's).

The median of the last intervals between updates, not a moving average of 1/interval: there,
one interval of 2 ms (two captures close together at the start of an export) added 47 to an
average of 30. Streams started then were told 58-60 fps for a 30 fps source
(bench/glass_x11.py with the X11 capture in a thread of its own), and kept it: x264 spent 48 %
of the bit rate it was given, and MJPEG's per-frame budget was halved (~216 KB/s where a
stream told 30 fps settles at ~410). Pure: fed with the update times.
"""

from __future__ import annotations

import collections
import statistics

WINDOW = 15  # intervals
DEFAULT_FPS = 30.0


class FrameRate:
    def __init__(self, default: float = DEFAULT_FPS):
        self.default = default
        self._last: float | None = None
        self._intervals: collections.deque = collections.deque(maxlen=WINDOW)

    def observe(self, now: float) -> None:
        """An update at `now`. Gaps of a second or more (an idle spell) are not a rate."""
        last, self._last = self._last, now
        if last is not None and 0 < now - last < 1:
            self._intervals.append(now - last)

    @property
    def fps(self) -> float:
        if not self._intervals:
            return self.default
        return 1.0 / statistics.median(self._intervals)
