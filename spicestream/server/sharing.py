"""One encode for many clients: clients that stream the same region with the same codec share
an encoder (an `EncoderHub`), each through its own `Subscription`.

A Subscription looks like a VideoEncoder to its client's StreamSender. The hub encodes each
display frame once, whoever offers it first, and hands every output to every subscriber; each
client then sends it or, if its socket is full, skips it and waits for a key frame. A client
that joins a running encoder gets a key frame of the current picture at once. The bit rate is
that of the slowest client the hub serves well; a client far below the others (or one that
keeps needing key frames) is moved by its StreamSender to an encoder of its own.
"""

from __future__ import annotations

import itertools
import threading
import time

KEY_REQUEST_GAP_S = 0.25  # forced key frames for everyone are expensive: at most this often
FAR_BELOW = 0.5  # a client whose rate is under this share of the others' gets its own tier


class EncoderHub:
    def __init__(self, registry: "EncoderRegistry", key, make_encoder):
        self.registry, self.key = registry, key
        self.lock = threading.Lock()
        self.subscribers: list[Subscription] = []
        self.rates: dict[Subscription, int] = {}
        self.meta: dict[int, tuple[int, float]] = {}  # timestamp -> (generation, capture time)
        self.last_generation = -1
        self.key_pending = False
        self.key_deferred = False  # asked for within the gap: owed once the gap has passed
        self.last_key_request = -1e9
        self.frames_encoded = 0
        self.encoder = make_encoder(self._on_frame, self._on_error)

    # -- from the encoder's threads ------------------------------------------------------------
    def _on_frame(self, frame) -> None:
        with self.lock:
            subscribers = list(self.subscribers)
            self.frames_encoded += 1
        for sub in subscribers:
            sub.on_frame(frame)

    def _on_error(self, message: str) -> None:
        self.registry.forget(self)  # nobody joins a failed encoder
        with self.lock:
            subscribers = list(self.subscribers)
        for sub in subscribers:
            sub.on_error(message)

    # -- from subscribers (event loop) ----------------------------------------------------------
    def submit(self, picture, timestamp: int, generation: int, published: float) -> bool:
        """Encode `picture` unless this generation is already encoded (and no key frame is
        owed). True when the frame is taken care of; a scanout reference is always consumed."""
        owned_scanout = hasattr(picture, "drm_fourcc")
        if self.key_deferred:
            self.request_key(time.monotonic())
        if generation <= self.last_generation and not self.key_pending:
            if owned_scanout:
                picture.release()
            return True
        if self.key_pending:
            self.encoder.force_key_frame()
        if not self.encoder.encode(picture, timestamp):
            return False
        self.key_pending = False
        self.last_generation = max(self.last_generation, generation)
        self.meta[timestamp] = (generation, published)
        if len(self.meta) > 512:
            for stale in list(self.meta)[:256]:
                del self.meta[stale]
        return True

    def request_key(self, now: float) -> None:
        if now - self.last_key_request >= KEY_REQUEST_GAP_S:
            self.last_key_request = now
            self.key_pending, self.key_deferred = True, False
        else:
            self.key_deferred = True  # never dropped: a client is waiting for it

    def set_rate(self, sub: "Subscription", rate: int) -> bool:
        """Record a subscriber's rate; apply the slowest. True if `sub` is far below the rest."""
        self.rates[sub] = rate
        others = [r for s, r in self.rates.items() if s is not sub]
        far_below = bool(others) and rate < FAR_BELOW * min(others)
        served = [r for s, r in self.rates.items() if not (others and s is sub and far_below)]
        self.encoder.set_bit_rate(min(served))
        return far_below

    def leave(self, sub: "Subscription") -> None:
        with self.lock:
            if sub in self.subscribers:
                self.subscribers.remove(sub)
            self.rates.pop(sub, None)
            empty = not self.subscribers
        if empty:
            self.registry.forget(self)
            self.encoder.close()


class Subscription:
    """One client's handle on a hub, shaped like the VideoEncoder its StreamSender expects."""

    def __init__(self, hub: EncoderHub, on_frame, on_error, joined_running: bool):
        self.hub, self.on_frame, self.on_error = hub, on_frame, on_error
        self.joined_running = joined_running  # the hub had encoded before: a key frame is owed
        self.closed = False

    @property
    def encoder(self):
        return self.hub.encoder

    @property
    def element(self) -> str:
        return self.hub.encoder.element

    @property
    def max_in_flight(self) -> int:
        return self.hub.encoder.max_in_flight

    @property
    def in_flight(self) -> int:
        return self.hub.encoder.in_flight

    @property
    def shared_by(self) -> int:
        return len(self.hub.subscribers)

    def encode(self, picture, timestamp: int, generation: int = -1, published: float = 0.0) -> bool:
        return self.hub.submit(picture, timestamp, generation, published)

    def frame_meta(self, timestamp: int) -> tuple[int, float] | None:
        return self.hub.meta.get(timestamp)

    def force_key_frame(self) -> None:
        self.hub.request_key(time.monotonic())

    def set_bit_rate(self, rate: int) -> bool:
        return self.hub.set_rate(self, rate)

    def set_quality(self, quality: int) -> None:
        if hasattr(self.hub.encoder, "set_quality"):
            self.hub.encoder.set_quality(quality)

    def output_totals(self) -> tuple[int, int]:
        return self.hub.encoder.output_totals()

    def stats(self) -> dict:
        info = self.hub.encoder.stats()
        info["shared_by"] = self.shared_by
        return info

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub.leave(self)


class EncoderRegistry:
    """Hubs by (codec entry, region, pixel format): where a joining client finds its encoder."""

    def __init__(self):
        self.hubs: dict = {}
        self._private = itertools.count()

    def subscribe(self, key, make_encoder, on_frame, on_error, shared: bool = True) -> Subscription:
        if not shared:
            key = ("private", next(self._private))
        hub = self.hubs.get(key)
        joined_running = hub is not None and hub.last_generation >= 0
        if hub is None:
            hub = EncoderHub(self, key, make_encoder)  # may raise EncoderError
            self.hubs[key] = hub
        sub = Subscription(hub, on_frame, on_error, joined_running)
        with hub.lock:
            hub.subscribers.append(sub)
        if joined_running:
            hub.key_pending = True  # a joiner is always served, whatever the gap
        return sub

    def forget(self, hub: EncoderHub) -> None:
        # Called from encoder threads too (on errors): never raise if the loop got there first.
        if self.hubs.get(hub.key) is hub:
            self.hubs.pop(hub.key, None)
