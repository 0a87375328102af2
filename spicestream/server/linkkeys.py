"""What a link hello costs us, bounded: RSA keys made ahead of need, off the event loop, and a
limit on hellos per network.

Every link reply carries a fresh RSA-1024 public key (brief §1.3). Making one takes ~10 ms of
CPU; made on the event loop, a peer sending hellos as fast as it can stalls every client's
frames. Keys are made on a worker thread (the key generation releases the GIL) and kept ready;
a hello that finds none waits for the next. A network sending more hellos than any client
needs (remote-viewer links five or six channels when it connects) is refused.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from typing import Callable

from ..protocol.link import new_link_key
from .tickets import network_of

READY_KEYS = 16
HELLO_RATE = 20.0  # per second and network, sustained...
HELLO_BURST = 40  # ...after a burst of this many


class LinkKeys:
    """A few keys always ready; `take()` one, or `wait()` for the next."""

    def __init__(self, ready: int = READY_KEYS, generate: Callable = new_link_key):
        self.size, self._generate = ready, generate
        self._ready: collections.deque = collections.deque()
        self._waiting: collections.deque = collections.deque()  # futures of hellos without a key
        self._pending = 0  # keys being made
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.made_on: collections.Counter = collections.Counter()  # thread names, for tests

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready.clear()
        self._pending = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spicestream-keys")
        self._refill()

    def take(self):
        """A ready key, or None (then `wait()`)."""
        key = self._ready.popleft() if self._ready else None
        self._refill()
        return key

    def wait(self) -> asyncio.Future:
        future = self._loop.create_future()
        self._waiting.append(future)
        self._refill()
        return future

    def _refill(self) -> None:
        if self._loop is None:
            return
        while len(self._ready) + self._pending < self.size + len(self._waiting):
            self._pending += 1
            self._loop.run_in_executor(self._executor, self._make).add_done_callback(self._made)

    def _make(self):
        self.made_on[threading.current_thread().name] += 1
        return self._generate()

    def _made(self, future: asyncio.Future) -> None:
        self._pending -= 1
        if future.cancelled() or future.exception() is not None:
            return
        key = future.result()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # the connection may have gone meanwhile
                waiter.set_result(key)
                return
        self._ready.append(key)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._loop = None
        for waiter in self._waiting:
            waiter.cancel()
        self._waiting.clear()


class HelloLimiter:
    """A token bucket per network; `allow(address, now)` is False once it is empty."""

    def __init__(self, rate: float = HELLO_RATE, burst: int = HELLO_BURST):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # network -> (tokens, when)

    def allow(self, address: str, now: float) -> bool:
        network = network_of(address)
        tokens, then = self._buckets.get(network, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if len(self._buckets) > 10_000:  # full buckets carry no information: forget them
            self._buckets = {n: (t, w) for n, (t, w) in self._buckets.items()
                             if t + (now - w) * self.rate < self.burst}
        if tokens < 1.0:
            self._buckets[network] = (tokens, now)
            return False
        self._buckets[network] = (tokens - 1.0, now)
        return True
