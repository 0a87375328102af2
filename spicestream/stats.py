"""A cumulative latency histogram (Prometheus-style buckets), cheap enough to feed per frame;
`stats()` and the /metrics endpoint both read its snapshot (one source of truth)."""

from __future__ import annotations

import bisect
import threading

DEFAULT_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class LatencyHistogram:
    def __init__(self, buckets_s=DEFAULT_BUCKETS_S):
        self.buckets = tuple(buckets_s)
        self._counts = [0] * (len(self.buckets) + 1)  # the last: above every bucket
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> dict:
        """{"buckets": upper bounds (s), "cumulative": counts <= each, "count", "sum"}."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for c in counts[:-1]:
            running += c
            cumulative.append(running)
        return {"buckets": list(self.buckets), "cumulative": cumulative, "count": sum(counts), "sum": total}
