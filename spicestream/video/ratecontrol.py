"""Rate control for one client's stream: how many bits per second, when to skip a frame,
and how far ahead of the client's clock to stamp frames. Pure logic, times passed in.

Inputs, each optional:
  - transport samples (`on_sample`): bytes the peer acknowledged so far (TCP_INFO), our own
    backlog (user space + kernel unsent), the TCP round-trip time and its minimum;
  - client stream reports (`on_report`, brief §5.10.7): late frames and the margin of the
    last frame (its stamp minus the client's clock when it arrived).

Like spice-server's controller it increases gently and decreases fast (AIMD), but it reacts
to queueing delay itself (RTT above its minimum, plus our backlog) within a few hundred
milliseconds instead of waiting for a 300 ms virtual buffer to overflow, and it sets the
rate from what the link actually delivered when it had to cut.

Stamps and the client's playout margin are not decided here (video/streampolicy.py); a
report with a quarter of its frames late by more than LATE_IS_CONGESTION_MS cuts the rate,
as a queue building on the link shows there first.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

MIN_BIT_RATE = 128_000
MAX_BIT_RATE = 60_000_000
QUEUE_HIGH_S = 0.060  # queueing delay that triggers a decrease
QUEUE_LOW_S = 0.020  # below this, the link has room
DECREASE_HOLDOFF_S = 0.25  # let a cut take effect before cutting again
INCREASE_INTERVAL_S = 0.5
INCREASE_FACTOR = 1.03  # probing above what the link is known to carry: gently
CATCH_UP = 0.5  # below it: close half the gap to HEADROOM x bandwidth per interval
HEADROOM = 0.85
DECREASE_FACTOR = 0.85  # of the delivered rate, when known
BLIND_DECREASE_FACTOR = 0.7  # of the target, when it is not
FLOOR_OF_BANDWIDTH = 0.5  # a cut never goes below this share of the measured bandwidth
USED_SHARE = 0.5  # raise the target only while the encoder uses this much of it (x264 spent
# 64 % of a cut target on hard content under load, and a 0.7 share kept it there, the link half used)
SKIP_QUEUE_S = 0.100  # skip frames before encoding while this much is queued
MAX_SKIP_S = 0.5
LATE_IS_CONGESTION_MS = 50.0
BANDWIDTH_WINDOW_S = 1.0


@dataclass
class RateStats:
    decreases: int = 0
    increases: int = 0
    skipped: dict = field(default_factory=collections.Counter)


class RateController:
    def __init__(self, start_bit_rate: int, fps: float, now: float,
                 min_bit_rate: int = MIN_BIT_RATE, max_bit_rate: int = MAX_BIT_RATE,
                 encode_ms: float = 10.0):
        self.min_bit_rate, self.max_bit_rate = min_bit_rate, max_bit_rate
        self.target = self._clamp(start_bit_rate)
        self.fps = max(1.0, fps)
        self.bandwidth: float | None = None  # bit/s delivered while the link was the limit
        self.queue_delay = 0.0  # seconds, latest estimate
        self.queue_bytes = 0
        self.stats = RateStats()
        self._acked: collections.deque = collections.deque()  # (now, bytes_acked)
        self._sent: collections.deque = collections.deque()  # (now, frame bytes)
        self._sent_bytes = 0  # the sum of _sent's frame bytes
        self._last_decrease = -1e9
        self._queue_at_cut = 0.0
        self._last_admitted = now
        self._last_change = now
        self.rtt_ms: float | None = None
        self.min_rtt_ms: float | None = None

    def _clamp(self, rate: float) -> int:
        return int(min(self.max_bit_rate, max(self.min_bit_rate, rate)))

    # -- transport ----------------------------------------------------------------------------
    def on_sample(self, now: float, queue_bytes: int, bytes_acked: int | None = None,
                  rtt_ms: float | None = None, min_rtt_ms: float | None = None,
                  in_flight: bool = True) -> bool:
        """Account one transport sample; True if the target changed. `in_flight`: data is
        sent but not yet acknowledged (the RTT is only news while something is in flight)."""
        self.queue_bytes = queue_bytes
        self.rtt_ms, self.min_rtt_ms = rtt_ms, min_rtt_ms
        network_queue = 0.0
        if rtt_ms is not None and min_rtt_ms is not None and (in_flight or queue_bytes):
            network_queue = max(0.0, rtt_ms - min_rtt_ms) / 1000.0
        delivered = self._delivered_rate(now, bytes_acked)
        backlogged = queue_bytes > 0 or network_queue > QUEUE_LOW_S
        if delivered is not None and backlogged:
            # A sample taken while data was waiting measures the link, not our pace...
            self.bandwidth = delivered if self.bandwidth is None else 0.7 * self.bandwidth + 0.3 * delivered
        elif delivered is not None and self.bandwidth is not None and delivered > self.bandwidth:
            # ...and whatever the link did deliver, it can carry: a floor that lets the
            # estimate follow a link that got faster.
            self.bandwidth = delivered
        drain_rate = max(self.bandwidth or self.target, self.min_bit_rate)
        self.queue_delay = network_queue + queue_bytes * 8 / drain_rate
        if self.queue_delay > QUEUE_HIGH_S:
            return self._decrease(now, delivered)
        if (self.queue_delay < QUEUE_LOW_S and now - self._last_change >= INCREASE_INTERVAL_S
                and self._using_allowance(now)):
            return self._increase(now)
        return False

    def on_sent(self, now: float, nbytes: int) -> None:
        """A frame of `nbytes` went to the socket (measures what the encoder really uses)."""
        self._sent.append((now, nbytes))
        self._sent_bytes += nbytes
        while self._sent and now - self._sent[0][0] > BANDWIDTH_WINDOW_S:
            self._sent_bytes -= self._sent.popleft()[1]

    def sent_rate(self, now: float) -> float:
        if len(self._sent) < 2:
            return 0.0
        span = max(now - self._sent[0][0], 1.0 / self.fps)
        return self._sent_bytes * 8 / span

    def _using_allowance(self, now: float) -> bool:
        # Raising a target the encoder does not reach (easy content) would only inflate it
        # until the next hard scene overshoots the link; spice-server checks the same.
        return self.sent_rate(now) >= USED_SHARE * self.target

    def _delivered_rate(self, now: float, bytes_acked: int | None) -> float | None:
        if bytes_acked is None:
            return None
        self._acked.append((now, bytes_acked))
        while len(self._acked) > 2 and now - self._acked[1][0] >= BANDWIDTH_WINDOW_S:
            self._acked.popleft()
        (t0, b0), (t1, b1) = self._acked[0], self._acked[-1]
        if t1 - t0 < 0.2:
            return None
        return (b1 - b0) * 8 / (t1 - t0)

    def _decrease(self, now: float, delivered: float | None) -> bool:
        # The queue takes about its own delay to drain after a cut: cutting again before that
        # would react to the same backlog twice and undershoot.
        if now - self._last_decrease < max(DECREASE_HOLDOFF_S, self._queue_at_cut):
            return False
        basis = self.bandwidth if self.bandwidth is not None else delivered
        if basis is not None and basis < self.target:
            new = basis * DECREASE_FACTOR
        else:
            new = self.target * BLIND_DECREASE_FACTOR
        if self.bandwidth is not None:
            new = max(new, self.bandwidth * FLOOR_OF_BANDWIDTH)
        self._last_decrease = self._last_change = now
        self._queue_at_cut = self.queue_delay
        return self._set(min(new, self.target), decrease=True)

    def _increase(self, now: float) -> bool:
        self._last_change = now
        known = None if self.bandwidth is None else self.bandwidth * HEADROOM
        if known is not None and self.target < known:
            new = self.target + (known - self.target) * CATCH_UP
        else:
            new = self.target * INCREASE_FACTOR
        return self._set(max(new, self.target * INCREASE_FACTOR), decrease=False)

    def _set(self, rate: float, decrease: bool) -> bool:
        new = self._clamp(rate)
        if new == self.target:
            return False
        self.target = new
        if decrease:
            self.stats.decreases += 1
        else:
            self.stats.increases += 1
        return True

    # -- client reports ---------------------------------------------------------------------------
    def on_report(self, now: float, num_frames: int, num_drops: int, last_frame_delay_ms: int) -> bool:
        """A STREAM_REPORT; True if the target changed. A quarter of the window late, by more
        than a busy client's jitter (the stamps' lead is only a few ms), means a queue is
        building on the link or the client's decoder cannot keep up: cut."""
        if (num_drops > 0 and num_frames > 0 and num_drops * 4 >= num_frames
                and last_frame_delay_ms < -LATE_IS_CONGESTION_MS):
            return self._decrease(now, None)
        return False

    # -- frames ---------------------------------------------------------------------------------
    def admit(self, now: float) -> str | None:
        """None to encode the next frame now, or why it is skipped before encoding. At least
        one frame per MAX_SKIP_S goes through, so the link is never left without a probe."""
        if self.queue_delay > SKIP_QUEUE_S and now - self._last_admitted < MAX_SKIP_S:
            self.stats.skipped["congested"] += 1
            return "congested"
        self._last_admitted = now
        return None

    def summary(self) -> dict:
        return {"bit_rate": self.target, "sent_rate": int(self.sent_rate(self._sent[-1][0])) if self._sent else 0,
                "bandwidth_estimate": None if self.bandwidth is None else int(self.bandwidth),
                "queue_delay_ms": round(self.queue_delay * 1000, 1), "queue_bytes": self.queue_bytes,
                "rtt_ms": self.rtt_ms, "min_rtt_ms": self.min_rtt_ms,
                "decreases": self.stats.decreases, "increases": self.stats.increases,
                "skipped": dict(self.stats.skipped)}
