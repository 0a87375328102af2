"""Sound the application plays (`server.audio`): samples in, 10 ms packets out, on the one
media clock the video stamps use.

`AudioOutput.write` takes int16 or float32 samples, interleaved or (n, channels), mono or
stereo, at 44.1 or 48 kHz, from any thread; they become 48 kHz stereo int16 in a queue
bounded at MAX_QUEUED_S (the oldest go first when a producer runs ahead; a live source's at
LIVE_MAX_QUEUED_MS, so a stall does not turn into lasting latency). `PacketClock`
(pure: fed with `now_ms`) cuts the queue into 10 ms packets at real-time pace: it starts a
stream when sound arrives, stamps packets 10 ms apart (never backwards, a gap after an
underrun), pads a pause with FILL_MS of silence packets (clients that need it get them), and
ends the stream after STOP_AFTER_MS of silence, so idle costs nothing. One Opus encode per
packet serves every client (server/audio.py sends them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

RATE = 48000
CHANNELS = 2
PACKET_SAMPLES = 480  # 10 ms at 48 kHz: what spice-gtk and spice-html5 decode
PACKET_MS = 10
MAX_QUEUED_S = 1.0
# A live source (the desktop's sound, PulseBridge) writes in real time, so what it has queued
# beyond a few packets is lateness: a stall (the GIL, a busy core) that it then delivered in
# one burst. The pump sends at real-time pace, so a backlog would stay as latency for as long
# as the stream runs; a live write keeps at most this much and drops the oldest.
LIVE_MAX_QUEUED_MS = 40
AHEAD_MS = 20  # send a packet this long before its time comes (the network's share)
STOP_AFTER_MS = 5000  # no sound for this long: STOP (clients close their audio device), as
# PulseAudio suspends an idle sink: a new stream costs the client's start-up (server/audio.py)
RATES = (44100, 48000)
QUIET_PEAK = 33  # int16 peak (-60 dBFS) of a packet that can be left out unheard
# Chromium's Media Source player (spice-html5) keeps ~160 ms of what it was given unplayed
# until more arrives: without packets after a sound, its end is not heard (and STOP then
# discards it). So once the application has been quiet for FILL_AFTER_MS (a pause, not a
# producer's jitter), FILL_MS of silence packets follow at real-time pace, as if it had
# written them; sound that comes meanwhile goes on right after the silence already sent (at
# most AHEAD_MS ahead of its time), so nothing waits behind more of it.
FILL_AFTER_MS = 50
FILL_MS = 300
DRAIN_OPENS_MS = 1500  # after START: the client's pipeline plays by then (0.7 s measured)
DRAIN_FORCED_MS = 4000  # after START: no quiet packet came, the rest go in one cut


class AudioError(ValueError):
    """Samples the server cannot take (type, rate, shape)."""


class Resampler:
    """44.1 -> 48 kHz by linear interpolation, continuous across calls (a few hundred
    samples of state); 48 kHz passes through."""

    def __init__(self, rate: int):
        self.rate = rate
        self._last: np.ndarray | None = None  # the previous call's last input sample
        self._pos = 0.0  # position of the next output sample, in input samples from _last

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.rate == RATE or len(x) == 0:
            return x
        src = x if self._last is None else np.concatenate([self._last[None], x])
        step = self.rate / RATE
        stop = len(src) - 1
        positions = np.arange(self._pos, stop, step)
        out = np.empty((len(positions), x.shape[1]), np.float32)
        for c in range(x.shape[1]):
            out[:, c] = np.interp(positions, np.arange(len(src)), src[:, c])
        self._pos = (positions[-1] + step - stop) if len(positions) else self._pos - stop
        self._last = src[-1].copy()
        return out


def to_stereo(samples, channels: int | None) -> np.ndarray:
    """(n, channels) float32 in [-1, 1] from int16 or float32, interleaved or 2-D."""
    a = np.asarray(samples)
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    elif a.dtype != np.float32 and a.dtype != np.float64:
        raise AudioError(f"samples of {a.dtype}: int16 or float32")
    a = a.astype(np.float32, copy=False)
    if a.ndim == 1:
        channels = channels or 1
        if channels not in (1, 2) or a.size % channels:
            raise AudioError(f"{a.size} interleaved samples of {channels} channel(s)")
        a = a.reshape(-1, channels)
    elif a.ndim != 2 or a.shape[1] not in (1, 2):
        raise AudioError(f"samples shaped {a.shape}: (n,), (n, 1) or (n, 2)")
    return a


@dataclass
class Packet:
    time_ms: int  # the media clock at which it plays (unwrapped)
    pcm: np.ndarray  # (480, 2) int16


class PacketClock:
    """When packets go out and what they are stamped. Pure: `now_ms` is passed in."""

    def __init__(self):
        self.playing = False
        self.next_ms = 0  # the media time of the next packet
        self.last_sound_ms = 0  # when the last packet of the application's sound went out
        self.filled_ms = 0  # silence sent since then (FILL_MS at most)

    def due(self, now_ms: int, queued_samples: int) -> tuple[str | None, int]:
        """('start' | 'stop' | 'fill' | None, packets to send now); 'fill': that many packets
        of silence (sent with `fill=True`)."""
        event = None
        available = queued_samples // PACKET_SAMPLES
        if not self.playing:
            if available == 0:
                return None, 0
            self.playing, self.next_ms, event = True, now_ms, "start"
        elif available == 0:
            quiet_for = now_ms - self.last_sound_ms
            if quiet_for >= STOP_AFTER_MS:
                self.playing = False
                return "stop", 0
            if quiet_for < FILL_AFTER_MS or self.filled_ms >= FILL_MS:
                return None, 0
            event, available = "fill", (FILL_MS - self.filled_ms) // PACKET_MS
        if self.next_ms < now_ms - AHEAD_MS:
            self.next_ms = now_ms  # the producer fell behind: a gap, never time going back
        count = 0
        while count < available and self.next_ms + count * PACKET_MS <= now_ms + AHEAD_MS:
            count += 1
        return event, count

    def next_due(self, now_ms: int, queued_samples: int) -> int | None:
        """Milliseconds until `due` has something to do if no samples arrive meanwhile (a
        write wakes the pump anyway); None: nothing until they do."""
        if not self.playing:
            return None
        if queued_samples >= PACKET_SAMPLES:
            return max(1, self.next_ms - AHEAD_MS - now_ms)
        quiet_for = now_ms - self.last_sound_ms
        wait = STOP_AFTER_MS - quiet_for
        if self.filled_ms < FILL_MS:
            if quiet_for < FILL_AFTER_MS:
                wait = min(wait, FILL_AFTER_MS - quiet_for)
            else:
                wait = min(wait, self.next_ms - AHEAD_MS - now_ms)
        return max(1, wait)

    def skip_fill(self) -> None:
        """No client takes silence now: this pause gets none."""
        self.filled_ms = FILL_MS

    def sent(self, now_ms: int, fill: bool = False) -> int:
        """Stamp (media ms) of the packet going out now; `fill`: one of silence."""
        stamp = self.next_ms
        self.next_ms += PACKET_MS
        if fill:
            self.filled_ms += PACKET_MS
        else:
            self.last_sound_ms, self.filled_ms = now_ms, 0
        return stamp


class BufferDrain:
    """Takes a client's audio buffer down by `amount_ms`, once per stream, by leaving packets
    out. Pure: fed with each packet's media time.

    spice-gtk plays untimestamped buffers (appsrc ! queue ! ... ! pulsesink): its pipeline
    starts with ~130 ms queued and keeps whatever it holds, since sound arrives at the rate it
    plays. Packets left out once it plays shorten that queue for good; an underrun does not
    refill it. Measured on a replica of its pipeline: 10 packets left out took it from 125 to
    24 ms, 20 packets to the 7 ms floor, for as long as it ran. Left out before it plays, they
    change nothing, so the drain opens at DRAIN_OPENS_MS. Quiet packets go first (silence
    shortened is not heard); from DRAIN_FORCED_MS what is left goes in one cut."""

    def __init__(self, start_ms: int, amount_ms: int):
        self.start_ms = start_ms
        self.left = max(0, amount_ms // PACKET_MS)  # packets still to leave out

    def extend(self, amount_ms: int) -> None:
        """Take the client's buffer down by `amount_ms` more (sound queued behind a burst)."""
        self.left += max(0, -(-amount_ms // PACKET_MS))

    def leave_out(self, packet_ms: int, quiet: bool) -> bool:
        """Whether the packet playing at media time `packet_ms` is left out."""
        if self.left == 0:
            return False
        age = packet_ms - self.start_ms
        if age < DRAIN_OPENS_MS or not (quiet or age >= DRAIN_FORCED_MS):
            return False
        self.left -= 1
        return True


def is_quiet(pcm: np.ndarray) -> bool:
    """A packet (int16) no one would miss."""
    return int(np.abs(pcm, dtype=np.int32).max()) <= QUIET_PEAK if len(pcm) else True


class AudioOutput:
    """`server.audio`: what the application plays. `wake` is called (from any thread) when
    samples arrive; the server's loop then calls `take(n)`."""

    def __init__(self, wake=lambda: None):
        self.wake = wake
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []  # float32 (n, 2) at 48 kHz
        self._queued = 0
        self._resamplers: dict[int, Resampler] = {}
        self.volume = 1.0
        self.muted = False
        self.on_volume = lambda: None  # the server's: tell clients
        self.dropped_samples = 0  # all dropped: the producer ran ahead, or a live one was late
        self.late_samples = 0  # of those, a live source's backlog after a stall
        self.written_samples = 0

    def write(self, samples, rate: int = RATE, channels: int | None = None, *, live: bool = False) -> None:
        """Queue samples to play: int16 or float32; interleaved 1-D (give `channels`, default
        mono) or (n, channels); `rate` 44100 or 48000. Any thread. `live`: the samples come
        from a source that produces in real time (a capture): only the newest
        LIVE_MAX_QUEUED_MS are kept queued, so sound that arrives late is dropped, not delayed."""
        if rate not in RATES:
            raise AudioError(f"rate {rate}: one of {', '.join(map(str, RATES))}")
        a = to_stereo(samples, channels)
        if a.shape[1] == 1:
            a = np.repeat(a, 2, axis=1)  # stereo before resampling: one resampler state per rate
        with self._lock:
            resampler = self._resamplers.setdefault(rate, Resampler(rate))
            resampled = resampler(a)
            # Our own copy: a caller may reuse its buffer as soon as write() returns.
            self._chunks.append(np.array(resampled, np.float32, order="C"))
            self._queued += len(a)
            self.written_samples += len(a)
            excess = self._queued - int(MAX_QUEUED_S * RATE)
            if live:
                late = self._queued - LIVE_MAX_QUEUED_MS * RATE // 1000
                if late > max(0, excess):
                    self.late_samples += late - max(0, excess)
                    excess = late
            if excess > 0:
                self._drop(excess)
        self.wake()

    def _drop(self, n: int) -> None:
        self.dropped_samples += n
        self._queued -= n
        while n > 0:
            head = self._chunks[0]
            if len(head) <= n:
                n -= len(head)
                self._chunks.pop(0)
            else:
                self._chunks[0] = head[n:]
                n = 0

    @property
    def queued(self) -> int:
        with self._lock:
            return self._queued

    def take(self, n: int = PACKET_SAMPLES) -> np.ndarray | None:
        """The next n samples as (n, 2) int16, or None if fewer are queued."""
        with self._lock:
            if self._queued < n:
                return None
            parts, need = [], n
            while need:
                head = self._chunks[0]
                part = head[:need]
                parts.append(part)
                need -= len(part)
                if len(part) == len(head):
                    self._chunks.pop(0)
                else:
                    self._chunks[0] = head[len(part):]
            self._queued -= n
        pcm = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return np.clip(np.rint(pcm * 32768.0), -32768, 32767).astype(np.int16)  # int16 in: exact

    def set_volume(self, volume: float, muted: bool | None = None) -> None:
        """Clients' playback volume, 0.0-1.0 (and mute). Any thread."""
        self.volume = min(1.0, max(0.0, float(volume)))
        if muted is not None:
            self.muted = bool(muted)
        self.on_volume()

    def stats(self) -> dict:
        return {"written_samples": self.written_samples, "dropped_samples": self.dropped_samples,
                "late_samples": self.late_samples, "queued_samples": self.queued}
