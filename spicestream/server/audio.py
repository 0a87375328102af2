"""Sound channels: playback (the application's sound to every client, one Opus encode shared)
and record (a client's microphone to `on_audio_in`).

Playback stamps are the media clock the video stamps use, plus PLAYBACK_DELAY_MS: spice-gtk
sets its clock to a packet's time less its audio pipeline's reported delay (a latency query:
130 ms with pulsesink), so packets stamped that far ahead keep the client's clock on ours and
video frames neither late nor held. MODE goes before START (spice-gtk builds its decoder from
it); STOP follows silence. A client whose socket is full keeps at most MAX_PENDING packets,
the newest.

spice-gtk's audio pipeline takes ~0.7 s after START to begin consuming, and whatever arrives
before then stays queued ahead of everything after: sound sent at once was heard 817 ms after
it was written. So the first SETTLE_MS of a stream's packets are not sent to a client that
announces LATENCY, which spice-gtk does (counted as "settling"; with 0.9 s, packets still raced
the pipeline's start: 2 of 4 runs began 30 ms fuller), and a stream stays open through pauses
shorter than output.STOP_AFTER_MS. The pipeline then starts with PLAYBACK_DELAY_MS queued and
keeps it; a `BufferDrain` leaves packets out until CLIENT_BUFFER_MS is left (counted as
"drained"), and LATENCY says so.

spice-html5 does not announce LATENCY and gets every packet at once: Chromium opens its Media
Source ~10 ms after START and plays from the first packet it gets; held back, the first 1.2 s
of every stream were simply lost there, and the player kept the same ~360 ms ahead either way
(measured in headless Chromium). Its player also holds back the last ~160 ms of what it has,
so after a pause it gets output.FILL_MS of silence packets ("filled") that push a sound's end
through. Its ~360 ms ahead is shortened by a `BufferDrain` too (BROWSER_DRAIN_MS).

Not sending the first SETTLE_MS would lose a sound shorter than that after a long silence (a
notification, a bell) whole. So those packets are held, and when settling
ends, if the sound has ended meanwhile (no packet for SOUND_ENDED_MS), they are sent then,
heard SETTLE_MS late rather than never (counted as "late_start"). They all carry the stamp
that is due then: spice-gtk sets its clock from a stream's first packet and plays the rest as
they come, so the picture's clock stays right and stamps never go back. Sound still playing
when settling ends loses its start, as before: it goes on without it at low latency. Sound
that follows while the client still plays such a burst queues behind it; the drain then
leaves out that much more ("overlap").
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

import numpy as np

from ..audio.opus import OpusDecoder, OpusEncoder, OpusError
from ..audio.output import (
    CHANNELS,
    PACKET_MS,
    PACKET_SAMPLES,
    RATE,
    AudioOutput,
    BufferDrain,
    PacketClock,
    is_quiet,
)
from ..protocol.constants import AUDIO_FMT_S16, AudioDataMode, PlaybackCap, RecordCap, has_cap
from ..protocol.messages import CLIENT, SERVER
from ..protocol.wire import ProtocolError
from ..video.streampolicy import wire_stamp
from .channels import ChannelHandler

if TYPE_CHECKING:
    from .core import ServerCore

log = logging.getLogger("spicestream.audio")

PLAYBACK_DELAY_MS = 130  # spice-gtk's audio pipeline delay with pulsesink: packets' stamp lead
CLIENT_BUFFER_MS = 30  # what a drained client keeps queued: its margin for late packets
# spice-html5 in Chromium starts playing with ~350 ms buffered and keeps that much; it gives
# each packet the time 10 ms after the last (playback.js), so packets left out shorten it for
# good. Measured in headless Chromium, also beside a busy core: 100 ms left out kept ~250 ms,
# 150 ms ~200 ms, never stalling; 250 ms stalled it once, and it then buffered ~490 ms.
BROWSER_DRAIN_MS = 100
SETTLE_MS = 1200  # packets of a new stream not sent while the client's pipeline starts
SOUND_ENDED_MS = 150  # no packet for this long when settling ends: a short sound, sent late
MAX_PENDING = 20  # 200 ms of packets waiting for a client's socket
SILENCE = np.zeros((PACKET_SAMPLES, CHANNELS), np.int16)


class AudioPump:
    """On the loop: turns `server.audio` into packets at real-time pace and hands each, once
    encoded, to every playback channel."""

    def __init__(self, core: "ServerCore", output: AudioOutput):
        self.core, self.output = core, output
        self.clock = PacketClock()
        self.channels: set[PlaybackChannel] = set()
        self.encoder: OpusEncoder | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.packets = 0
        self.filled = 0  # of those, silence after a pause (FILL_MS)
        self.runs = 0  # times the pump ran: its wake-ups
        self.encode_s = 0.0

    def wake(self) -> None:
        """Samples arrived: pump now (a timer set for later is replaced)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_soon(self.pump)

    def reset(self) -> None:
        """The server stopped: forget the loop's timer and the stream (queued sound stays)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self.clock = PacketClock()
        self.output.wake = lambda: None

    def pump(self) -> None:
        self._timer = None
        self.runs += 1
        now = self.core.mm_ms(self.core.clock())
        event, count = self.clock.due(now, self.output.queued)
        if event == "start":
            for channel in list(self.channels):
                channel.start_stream(now)
        fill = event == "fill"
        takers = [c for c in self.channels if c.takes_fill] if fill else list(self.channels)
        if fill and not takers:
            count = 0  # silence nobody wants is not encoded
            self.clock.skip_fill()
        for _ in range(count):
            pcm = SILENCE if fill else self.output.take(PACKET_SAMPLES)
            if pcm is None:
                break
            stamp = self.clock.sent(now, fill) + PLAYBACK_DELAY_MS
            opus = self._encode(pcm) if any(c.opus for c in takers) else None
            raw = pcm.tobytes()
            quiet = fill or is_quiet(pcm)
            self.packets += 1
            self.filled += fill
            for channel in takers:
                channel.send_packet(stamp, opus, raw, quiet, fill)
        if event == "stop":
            for channel in list(self.channels):
                channel.stop_stream()
        # Woken again when the next packet, silence or STOP is due, or by a write: not on a
        # fixed tick (a 5 ms one cost 200 wake-ups a second, 1000 in each stream's last 5 s).
        delay_ms = self.clock.next_due(now, self.output.queued)
        if delay_ms is not None:
            self._timer = asyncio.get_running_loop().call_later(delay_ms / 1000, self.pump)

    def _encode(self, pcm: np.ndarray) -> bytes:
        if self.encoder is None:
            self.encoder = OpusEncoder(RATE, CHANNELS)
        start = self.core.clock()
        packet = self.encoder.encode(pcm)
        self.encode_s += self.core.clock() - start
        return packet

    def stats(self) -> dict:
        return {"packets": self.packets, "filled": self.filled, "pump_runs": self.runs,
                "playing": self.clock.playing,
                "encode_ms_per_packet": round(1000 * self.encode_s / max(1, self.packets), 3),
                **self.output.stats()}


class PlaybackChannel(ChannelHandler):
    def start(self) -> None:
        self.opus = has_cap(self.caps, PlaybackCap.OPUS)
        self.volume_cap = has_cap(self.caps, PlaybackCap.VOLUME)
        self.latency_cap = has_cap(self.caps, PlaybackCap.LATENCY)
        self.pending: collections.deque = collections.deque(maxlen=MAX_PENDING)
        self.streaming = False
        self.dropped = 0
        self.settling = 0  # packets not sent while the client's pipeline started
        self.settle_until = 0
        self.held: collections.deque = collections.deque(maxlen=SETTLE_MS // PACKET_MS)
        self.settle_timer: asyncio.TimerHandle | None = None
        self.last_media_ms: int | None = None  # the newest packet's media time
        self.late_start = 0  # packets of a short sound sent when settling ended
        self.burst_ends_ms: int | None = None  # media time the client ends playing that burst
        self.overlap = 0  # packets of later sound that queued behind the burst
        self.drain: BufferDrain | None = None
        self.drained = 0  # packets left out to shorten the client's queue
        self.filled = 0  # silence packets sent after a pause
        self.sent = 0
        pump = self.core.audio
        pump.channels.add(self)
        self.send_volume()
        if pump.clock.playing:  # joined while sound plays: start at the next packet
            self.start_stream(self.core.mm_ms(self.core.clock()))

    def send_volume(self) -> None:
        if not self.volume_cap:
            return
        output = self.core.audio.output
        level = int(round(output.volume * 65535))
        self.conn.send(SERVER.PLAYBACK_VOLUME((level,) * CHANNELS))
        self.conn.send(SERVER.PLAYBACK_MUTE(int(output.muted)))
        self.conn.flush()

    def start_stream(self, now_ms: int) -> None:
        mode = AudioDataMode.OPUS if self.opus else AudioDataMode.RAW
        time = wire_stamp(now_ms + PLAYBACK_DELAY_MS)
        self.conn.send(SERVER.PLAYBACK_MODE(time, mode, b""))
        self.conn.send(SERVER.PLAYBACK_START(CHANNELS, AUDIO_FMT_S16, RATE, time))
        if self.latency_cap:
            self.conn.send(SERVER.PLAYBACK_LATENCY(CLIENT_BUFFER_MS))
            self.drain = BufferDrain(now_ms, PLAYBACK_DELAY_MS - CLIENT_BUFFER_MS)
        elif self.conn.ws is not None:  # a browser: spice-html5's Media Source player
            self.drain = BufferDrain(now_ms, BROWSER_DRAIN_MS)
        else:
            self.drain = None
        self.streaming = True
        self._cancel_settle()
        if self.latency_cap:  # spice-gtk's pipeline (above); spice-html5 plays what it gets
            self.settle_until = now_ms + SETTLE_MS
            self.settle_timer = asyncio.get_running_loop().call_later(SETTLE_MS / 1000, self._settled)
        else:
            self.settle_until = 0
        self.conn.flush()

    def _cancel_settle(self) -> None:
        if self.settle_timer is not None:
            self.settle_timer.cancel()
            self.settle_timer = None
        self.held.clear()
        self.burst_ends_ms = None

    def _settled(self) -> None:
        """Settling is over: a short sound held meanwhile is sent now, at the stamp due now."""
        self.settle_timer = None
        held = list(self.held)
        self.held.clear()
        now_ms = self.core.mm_ms(self.core.clock())
        if not held or not self.streaming or self.last_media_ms is None \
                or now_ms - self.last_media_ms < SOUND_ENDED_MS:
            return  # nothing held, or the sound goes on: its start stays left out
        stamp = wire_stamp(now_ms + PLAYBACK_DELAY_MS)
        self.settling -= len(held)
        self.late_start += len(held)
        self.burst_ends_ms = now_ms + len(held) * PACKET_MS
        for data in held:
            if len(self.pending) == self.pending.maxlen:
                self.writable()  # the burst goes out as the socket takes it
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1
            self.pending.append(SERVER.PLAYBACK_DATA(stamp, data))
        self.writable()

    @property
    def takes_fill(self) -> bool:
        """Whether silence after a pause is sent here: to clients without LATENCY (spice-html5,
        whose player holds back the end of what it has); spice-gtk plays what it has."""
        return self.streaming and not self.latency_cap

    def send_packet(self, stamp_ms: int, opus: bytes | None, raw: bytes, quiet: bool = False,
                    fill: bool = False) -> None:
        """One packet; `fill`: silence after a pause, which the pump gives `takes_fill` channels
        only."""
        if not self.streaming:
            return
        self.filled += fill
        media_ms = stamp_ms - PLAYBACK_DELAY_MS
        self.last_media_ms = media_ms
        data = opus if self.opus else raw
        if media_ms < self.settle_until:
            self.settling += 1
            if self.settle_timer is not None:
                self.held.append(data)
            return
        if self.burst_ends_ms is not None:  # the first packet after a late-start burst
            behind = -(-(self.burst_ends_ms - media_ms) // PACKET_MS)
            self.burst_ends_ms = None
            if behind > 0 and self.drain is not None:
                self.overlap += behind
                self.drain.extend(behind * PACKET_MS)
        if self.drain is not None and self.drain.leave_out(media_ms, quiet):
            self.drained += 1
            return
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1  # the oldest goes: a stalled client never grows memory
        self.pending.append(SERVER.PLAYBACK_DATA(wire_stamp(stamp_ms), data))
        self.writable()

    def writable(self) -> None:
        while self.pending and self.conn.can_send:
            self.conn.send(self.pending.popleft())
            self.sent += 1
        self.conn.flush()

    def stop_stream(self) -> None:
        self._cancel_settle()
        if self.streaming:
            self.pending.clear()
            self.conn.send(SERVER.PLAYBACK_STOP())
            self.conn.flush()
            self.streaming = False

    def closed(self) -> None:
        self._cancel_settle()
        self.core.audio.channels.discard(self)
        super().closed()

    def stats(self) -> dict:
        return {"mode": "opus" if self.opus else "raw", "sent": self.sent, "dropped": self.dropped,
                "settling": self.settling, "late_start": self.late_start, "drained": self.drained,
                "filled": self.filled, "overlap": self.overlap}


class RecordChannel(ChannelHandler):
    """A client's microphone: recording runs while the application has `on_audio_in`."""

    def start(self) -> None:
        self.opus_cap = has_cap(self.caps, RecordCap.OPUS)
        self.mode = AudioDataMode.RAW  # until MODE says otherwise (as spice-server does)
        self.decoder: OpusDecoder | None = None
        self.recording = False
        self.packets = 0
        self.core.record_channels.add(self)
        self.sync()

    def sync(self) -> None:
        """START while the application listens, STOP when it stops."""
        want = self.core.on_audio_in is not None
        if want and not self.recording:
            self.conn.send(SERVER.RECORD_START(CHANNELS, AUDIO_FMT_S16, RATE))
        elif not want and self.recording:
            self.conn.send(SERVER.RECORD_STOP())
        self.recording = want
        self.conn.flush()

    def handle(self, message) -> None:
        kind = type(message)
        if kind is CLIENT.RECORD_MODE:
            if message.mode not in (AudioDataMode.RAW, AudioDataMode.OPUS):
                raise ProtocolError(f"record mode {message.mode}")
            if message.mode == AudioDataMode.OPUS and not self.opus_cap:
                raise ProtocolError("Opus recording from a client that did not announce it")
            self.mode = AudioDataMode(message.mode)
        elif kind is CLIENT.RECORD_DATA:
            if not self.recording:
                return  # in flight when we stopped
            self.packets += 1
            self.core.emit_audio_in(self._decode(message.data), RATE, CHANNELS)

    def _decode(self, data: bytes) -> np.ndarray:
        if self.mode == AudioDataMode.OPUS:
            if self.decoder is None:
                self.decoder = OpusDecoder(RATE, CHANNELS)
            try:
                pcm = self.decoder.decode(data)
            except OpusError as exc:
                raise ProtocolError(f"record data: {exc}") from None
            if len(pcm) > PACKET_SAMPLES * 6:  # 60 ms: more than a microphone packet holds
                raise ProtocolError(f"record packet of {len(pcm)} samples")
            return pcm
        if len(data) % (2 * CHANNELS):
            raise ProtocolError(f"raw record data of {len(data)} bytes")
        return np.frombuffer(data, "<i2").reshape(-1, CHANNELS).copy()

    def closed(self) -> None:
        self.core.record_channels.discard(self)
        if self.decoder is not None:
            self.decoder.close()
        super().closed()


__all__ = ["AudioPump", "PlaybackChannel", "RecordChannel", "PACKET_MS"]
