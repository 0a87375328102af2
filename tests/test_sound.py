"""Sound: the packet clock with an injected clock, PCM conversion, the playback and record
channels with the headless client (Opus and raw, shared encode, stalled clients, hostile
microphone data), and remote-viewer playing a tone into a PulseAudio null sink."""

from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np
import pytest

import spicestream
from spicestream.audio.opus import OpusDecoder, OpusEncoder
from spicestream.audio.output import (
    AHEAD_MS,
    FILL_AFTER_MS,
    FILL_MS,
    DRAIN_FORCED_MS,
    DRAIN_OPENS_MS,
    PACKET_MS,
    STOP_AFTER_MS,
    AudioError,
    AudioOutput,
    BufferDrain,
    PacketClock,
    Resampler,
    is_quiet,
)
from spicestream.protocol.constants import AudioDataMode, PlaybackCap, RecordCap
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.messages import CLIENT, SERVER
from spicestream.server.audio import CLIENT_BUFFER_MS, PLAYBACK_DELAY_MS, SETTLE_MS
from spicestream.testing.client import TestClient

import pulse
from helpers import Background

try:
    from . import xclient
except ImportError:
    import xclient

RATE = 48000


def tone(freq: float, start: int, n: int, level: float = 0.5) -> np.ndarray:
    return (np.sin(2 * np.pi * freq * np.arange(start, start + n) / RATE) * level).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


class TonePlayer(Background):
    """Writes a tone to server.audio in 10 ms pieces, paced by deadline (not by sleeping after
    the work); counts the samples it wrote."""

    def __init__(self, server, freq=440.0, seconds=None):
        self.server, self.freq, self.seconds = server, freq, seconds
        self.written = 0
        super().__init__()

    def run(self):
        start = time.monotonic()
        while not self.stop.is_set():
            if self.seconds is not None and self.written >= self.seconds * RATE:
                break
            self.server.audio.write(tone(self.freq, self.written, 480))
            self.written += 480
            self.stop.wait(max(0.0, start + self.written / RATE - time.monotonic()))


# -- pure parts ------------------------------------------------------------------------------------
def test_packet_clock_starts_steps_fills_a_pause_and_stops():
    clock = PacketClock()
    assert clock.due(1000, 479) == (None, 0)  # less than a packet: nothing starts
    event, count = clock.due(1000, 480 * 10)
    assert event == "start" and count == 1 + AHEAD_MS // PACKET_MS  # up to AHEAD_MS ahead
    stamps = [clock.sent(1000) for _ in range(count)]
    assert stamps == [1000 + PACKET_MS * i for i in range(count)]
    assert clock.due(1005, 480 * 5) == (None, 0)  # the next one is not due yet
    assert clock.due(1011, 480 * 5)[1] == 1
    assert clock.sent(1011) == stamps[-1] + PACKET_MS
    last = stamps[-1] + PACKET_MS
    # The producer stops. A shorter quiet is its jitter: nothing. From FILL_AFTER_MS on,
    # silence at real-time pace (never more than AHEAD_MS early), FILL_MS of it in all.
    assert clock.due(1011 + FILL_AFTER_MS - 1, 0) == (None, 0)
    fills = []  # (sent at, stamp)
    for now in range(1011 + FILL_AFTER_MS, 1700, 5):
        event, count = clock.due(now, 0)
        assert event in ("fill", None) and (count == 0 or event == "fill")
        fills += [(now, clock.sent(now, fill=True)) for _ in range(count)]
    assert len(fills) == FILL_MS // PACKET_MS
    fill_stamps = [stamp for _, stamp in fills]
    assert fill_stamps[0] > last  # later than the sound, never back
    assert fill_stamps == list(range(fill_stamps[0], fill_stamps[0] + FILL_MS, PACKET_MS))
    assert all(stamp - AHEAD_MS <= at <= stamp + AHEAD_MS for at, stamp in fills)  # paced
    # Sound again, long after: it goes out at once, from now (a gap, not time going back).
    event, count = clock.due(1700, 480)
    assert (event, count) == (None, 1) and clock.sent(1700) == 1700 > fill_stamps[-1]
    # Sound that comes back during a fill goes on right after the silence already sent (at
    # most AHEAD_MS of it): no more silence is put before it.
    event, count = clock.due(1760, 0)
    assert event == "fill" and count >= 1
    filled = [clock.sent(1760, fill=True) for _ in range(count)]
    assert filled[-1] <= 1760 + AHEAD_MS
    event, count = clock.due(filled[-1] + PACKET_MS - AHEAD_MS, 480 * 3)
    assert event is None and count == 1
    resumed = filled[-1] + PACKET_MS - AHEAD_MS
    assert clock.sent(resumed) == filled[-1] + PACKET_MS
    # Quiet for STOP_AFTER_MS after the last packet of sound: stop; sound again: a new start.
    assert clock.due(resumed + STOP_AFTER_MS - 1, 0)[0] != "stop"
    assert clock.due(resumed + STOP_AFTER_MS, 0) == ("stop", 0)
    assert clock.due(9000, 480)[0] == "start"


def test_packet_clock_says_when_it_is_next_due():
    clock = PacketClock()
    assert clock.next_due(1000, 480 * 10) is None  # not playing: the write that starts it wakes us
    event, count = clock.due(1000, 480 * 10)
    [clock.sent(1000) for _ in range(count)]
    upcoming = 1000 + count * PACKET_MS
    assert clock.next_due(1000, 480 * 7) == upcoming - AHEAD_MS - 1000  # the next packet's turn
    assert clock.next_due(upcoming, 480 * 7) == 1  # late: at once, never 0 (no busy loop)
    assert clock.next_due(1000, 0) == FILL_AFTER_MS  # nothing queued: when a fill would start
    assert clock.due(1000 + FILL_AFTER_MS, 0)[0] == "fill"
    clock.skip_fill()  # nobody takes silence: the next thing due is STOP
    assert clock.next_due(1000 + FILL_AFTER_MS, 0) == STOP_AFTER_MS - FILL_AFTER_MS
    assert clock.due(1000 + STOP_AFTER_MS, 0) == ("stop", 0)
    assert clock.next_due(1000 + STOP_AFTER_MS, 0) is None


def test_buffer_drain_leaves_out_quiet_packets_once_the_client_plays_then_cuts_the_rest():
    drain = BufferDrain(1000, 100)
    opens = 1000 + DRAIN_OPENS_MS
    assert not drain.leave_out(opens - PACKET_MS, True)  # the client's pipeline may not play yet
    assert not drain.leave_out(opens, False)  # sound is kept while the drain may wait
    kept = [drain.leave_out(opens + PACKET_MS * i, True) for i in range(1, 13)]
    assert kept == [True] * 10 + [False] * 2 and drain.left == 0
    # No quiet packet before DRAIN_FORCED_MS: from then on the rest goes in one cut.
    drain = BufferDrain(0, 45)
    assert not drain.leave_out(DRAIN_FORCED_MS - PACKET_MS, False)
    assert [drain.leave_out(DRAIN_FORCED_MS + PACKET_MS * i, False) for i in range(6)] == [True] * 4 + [False] * 2
    assert not BufferDrain(0, 0).leave_out(DRAIN_FORCED_MS, True)
    drain = BufferDrain(0, 20)
    drain.extend(25)  # sound queued behind a burst: 3 packets more (rounded up)
    assert [drain.leave_out(DRAIN_OPENS_MS + PACKET_MS * i, True) for i in range(7)] == [True] * 5 + [False] * 2
    assert is_quiet(np.full((480, 2), 33, np.int16)) and not is_quiet(np.full((480, 2), -34, np.int16))
    assert not is_quiet(np.full((480, 2), -32768, np.int16))


def test_resampling_keeps_the_pitch_and_continuity():
    resampler = Resampler(44100)
    x = np.sin(2 * np.pi * 1000 * np.arange(44100) / 44100).astype(np.float32)[:, None]
    out = np.concatenate([resampler(x[i:i + 441]) for i in range(0, 44100, 441)])
    assert abs(len(out) - RATE) <= 2
    assert abs(peak_hz(out[:, 0]) - 1000) < 2
    assert np.abs(np.diff(out[:, 0])).max() < 0.2  # no jumps at the call boundaries


def test_write_converts_and_bounds_what_it_queues():
    output = AudioOutput()
    output.write(np.full(960, 16384, np.int16))  # mono int16 -> stereo float
    pcm = output.take()
    assert pcm.shape == (480, 2) and (pcm == 16384).all()  # int16 in, the same int16 out
    output.write(np.zeros((100, 2), np.float32), rate=44100)
    with pytest.raises(AudioError):
        output.write(np.zeros(10, np.float32), rate=22050)
    with pytest.raises(AudioError):
        output.write(np.zeros((10, 3), np.float32))
    with pytest.raises(AudioError):
        output.write(np.zeros(10, np.int32))
    for _ in range(30):  # 3 s written at once: only the newest second stays
        output.write(np.zeros(RATE // 10, np.float32))
    assert output.queued <= RATE and output.dropped_samples >= 2 * RATE - 1000


def test_a_live_source_keeps_only_its_newest_packets_queued():
    """A capture that stalled and then delivers its backlog at once: the oldest is dropped, so
    the stall does not stay as latency; an application's file, written ahead, is all kept."""
    from spicestream.audio.output import LIVE_MAX_QUEUED_MS

    bound = LIVE_MAX_QUEUED_MS * RATE // 1000
    live = AudioOutput()
    ramp = np.arange(30 * 480, dtype=np.int16)  # 300 ms whose every sample is its own index
    for i in range(30):
        live.write(ramp[i * 480 : (i + 1) * 480], live=True)
        assert live.queued <= bound
    assert live.queued == bound and live.late_samples == len(ramp) - bound == live.dropped_samples
    newest = np.concatenate([live.take()[:, 0] for _ in range(bound // 480)])
    assert (newest == ramp[-bound:]).all()  # what stays is the end of the burst, in order
    ahead = AudioOutput()
    ahead.write(ramp)  # a player writing 300 ms ahead of time
    assert ahead.queued == len(ramp) and ahead.late_samples == ahead.dropped_samples == 0
    assert ahead.stats()["late_samples"] == 0 and live.stats()["late_samples"] == len(ramp) - bound


# -- the channels, with the headless client --------------------------------------------------------
@pytest.fixture
def server(monkeypatch):
    # Streams end after 0.3 s of silence here (5 s in use): the tests wait for STOP.
    monkeypatch.setattr("spicestream.audio.output.STOP_AFTER_MS", 300)
    srv = spicestream.Server(port=0, width=64, height=64).start()
    srv.display.update(np.zeros((64, 64, 4), np.uint8))
    yield srv
    srv.stop()


def audio_client(server, opus=True, record=False, latency=True, **kw) -> TestClient:
    caps = {Ch.PLAYBACK: (PlaybackCap.VOLUME,) + ((PlaybackCap.LATENCY,) if latency else ()) +
            ((PlaybackCap.OPUS,) if opus else ()),
            Ch.RECORD: (RecordCap.VOLUME,) + ((RecordCap.OPUS,) if opus else ())}
    channels = (Ch.PLAYBACK,) + ((Ch.RECORD,) if record else ())
    return TestClient("127.0.0.1", server.port, channels=channels, channel_caps=caps, **kw)  # `with` connects


def playback(client, kind):
    return [m for m in list(client.messages) if type(m) is kind]


def test_playback_opus_and_raw_clients_share_one_encode_and_get_the_tone(server):
    with audio_client(server) as opus_client, audio_client(server, opus=False) as raw_client:
        with TonePlayer(server, 440.0, seconds=2.0) as player:
            for client in (opus_client, raw_client):
                client.wait_for(lambda c: playback(c, SERVER.PLAYBACK_STOP), timeout=15, what="the stream's end")
        # Packets of the client's start-up (SETTLE_MS of media time) are not sent: how many,
        # each channel counted (a producer late under load shifts media time).
        settling = {c.stats()["mode"]: c.settling for c in server._core.audio.channels}
        drained = {AudioDataMode.OPUS if c.opus else AudioDataMode.RAW: c.drained for c in server._core.audio.channels}
        for client, mode in ((opus_client, AudioDataMode.OPUS), (raw_client, AudioDataMode.RAW)):
            kinds = [type(m) for m in client.messages if type(m).__name__.startswith("PLAYBACK")]
            first_data = kinds.index(SERVER.PLAYBACK_DATA)
            assert kinds.index(SERVER.PLAYBACK_MODE) < kinds.index(SERVER.PLAYBACK_START) < first_data
            assert playback(client, SERVER.PLAYBACK_MODE)[0].mode == mode
            start = playback(client, SERVER.PLAYBACK_START)[0]
            assert (start.channels, start.format, start.frequency) == (2, 1, RATE)
            data = playback(client, SERVER.PLAYBACK_DATA)
            # Every 10 ms written went out, but those of the client's start-up.
            settled = settling["opus" if mode == AudioDataMode.OPUS else "raw"]
            assert 0 < settled <= SETTLE_MS // PACKET_MS
            assert drained[mode] == 0  # a 2 s tone: never quiet, and over before DRAIN_FORCED_MS
            assert len(data) == player.written // 480 - settled
            times = [d.time for d in data]
            assert all(t != 0 for t in times) and all(b - a >= PACKET_MS for a, b in zip(times, times[1:]))
            if mode == AudioDataMode.OPUS:
                decoder = OpusDecoder()
                pcm = np.concatenate([decoder.decode(d.data) for d in data])
            else:
                pcm = np.concatenate([np.frombuffer(d.data, "<i2").reshape(-1, 2) for d in data])
                want = np.clip(np.rint(tone(440.0, 0, player.written) * 32768), -32768, 32767)
                want = want[settled * 480:settled * 480 + len(pcm)]
                assert (pcm[:, 0] == want).all() and (pcm[:, 1] == want).all()  # raw is exact
            assert abs(peak_hz(pcm[2400:, 0] / 32768.0) - 440) < 5
        stats = server._core.audio.stats()
        assert stats["packets"] == player.written // 480  # encoded once for both clients


class SoundThenSilence(Background):
    """Writes a tone, silence, then the tone again (seconds each), in 10 ms pieces paced by
    deadline; remembers what it wrote."""

    def __init__(self, server, parts):
        self.server, self.parts = server, parts
        self.written: list[np.ndarray] = []
        super().__init__()

    def run(self):
        start, n = time.monotonic(), 0
        for level, seconds in self.parts:
            for _ in range(int(seconds * 100)):
                piece = tone(440.0, n, 480, level)
                self.server.audio.write(piece)
                self.written.append(piece)
                n += 480
                if self.stop.wait(max(0.0, start + n / RATE - time.monotonic())):
                    return


def test_a_latency_client_has_its_queue_drained_with_quiet_packets_only(server):
    """spice-gtk (LATENCY cap) starts its pipeline with PLAYBACK_DELAY_MS queued: the server
    leaves out that much less CLIENT_BUFFER_MS, quiet packets only, once the client plays. A
    client without the cap gets every packet from the stream's first, and silence after its
    end."""
    parts = [(0.5, 1.0), (0.0, 1.5), (0.5, 0.5)]  # media 0-1 s tone, 1-2.5 s silence, then tone
    with audio_client(server, opus=False) as drained_client, \
            audio_client(server, opus=False, latency=False) as whole_client:
        with SoundThenSilence(server, parts):
            for client in (drained_client, whole_client):
                client.wait_for(lambda c: playback(c, SERVER.PLAYBACK_STOP), timeout=20, what="the stream's end")
        drained = {c.latency_cap: c.drained for c in server._core.audio.channels}
        filled = {c.latency_cap: c.filled for c in server._core.audio.channels}
    assert [m.latency_ms for m in playback(drained_client, SERVER.PLAYBACK_LATENCY)] == [CLIENT_BUFFER_MS]
    assert not playback(whole_client, SERVER.PLAYBACK_LATENCY)
    start = playback(drained_client, SERVER.PLAYBACK_START)[0].time
    assert playback(whole_client, SERVER.PLAYBACK_START)[0].time == start
    whole = {d.time: d.data for d in playback(whole_client, SERVER.PLAYBACK_DATA)}
    written = sum(int(seconds * 100) for _, seconds in parts)
    assert filled[True] == 0 and 0 < filled[False] <= FILL_MS // PACKET_MS  # STOP may cut it
    stamps = sorted(whole)
    assert stamps[0] == start and len(stamps) == written + filled[False]  # nothing held back
    fill = stamps[written:]
    assert all(not any(whole[t]) for t in fill)
    kept = {d.time for d in playback(drained_client, SERVER.PLAYBACK_DATA)}
    settled = {t for t in stamps[:written] if t - start >= SETTLE_MS}
    left_out = sorted(settled - kept)
    assert kept <= settled
    assert len(left_out) == (PLAYBACK_DELAY_MS - CLIENT_BUFFER_MS) // PACKET_MS
    # Each left out once the client's pipeline plays (stamps lead media time by the delay),
    # and each one silent: what spice-gtk plays is the tone whole.
    assert all(t - start >= DRAIN_OPENS_MS for t in left_out)
    assert all(not any(whole[t]) for t in left_out)
    assert drained == {True: len(left_out), False: 0}


def test_a_short_sound_after_silence_is_sent_late_to_a_latency_client_and_at_once_to_others(server, monkeypatch):
    """A 300 ms beep that starts a stream ends inside the first SETTLE_MS, which spice-gtk does
    not get: it gets the beep when settling ends, whole, every packet at the stamp due then. A
    client without LATENCY (spice-html5) gets it at once, each packet at its own stamp, then
    silence. A sound still going when settling ends loses its start for spice-gtk, as before."""
    monkeypatch.setattr("spicestream.audio.output.STOP_AFTER_MS", 3000)  # past settling
    beep = (np.sin(2 * np.pi * 440 * np.arange(30 * 480) / RATE) * 8000).astype(np.int16)

    def pcm_of(data):
        return np.frombuffer(b"".join(d.data for d in data), "<i2").reshape(-1, 2)

    with audio_client(server, opus=False) as gtk, audio_client(server, opus=False, latency=False) as html5:
        written = time.monotonic()
        server.audio.write(beep)
        gtk.wait_for(lambda c: len(playback(c, SERVER.PLAYBACK_DATA)) >= 30, timeout=10, what="the beep")
        arrived = time.monotonic()
        start = playback(gtk, SERVER.PLAYBACK_START)[0].time
        data = playback(gtk, SERVER.PLAYBACK_DATA)
        got = pcm_of(data)
        assert len(data) == 30 and (got[:, 0] == beep).all() and (got[:, 1] == beep).all()
        stamps = {d.time for d in data}
        assert len(stamps) == 1 and stamps.pop() - start >= SETTLE_MS  # the stamp due when sent
        assert arrived - written >= SETTLE_MS / 1000 * 0.9  # sent when settling ended, not before
        gtk.wait_for(lambda c: playback(c, SERVER.PLAYBACK_STOP), timeout=10, what="the stream's end")
        html5.wait_for(lambda c: playback(c, SERVER.PLAYBACK_STOP), timeout=10, what="the stream's end")
        at_once = playback(html5, SERVER.PLAYBACK_DATA)
        assert playback(html5, SERVER.PLAYBACK_START)[0].time == start
        filled = {c.latency_cap: c.filled for c in server._core.audio.channels}
        assert filled == {True: 0, False: FILL_MS // PACKET_MS}
        assert len(at_once) == 30 + filled[False]
        times = [d.time for d in at_once]
        assert times[:30] == [start + PACKET_MS * i for i in range(30)]  # each at its own time
        assert times[31:] == [times[30] + PACKET_MS * i for i in range(1, len(times) - 30)]
        assert times[30] > times[29]  # the silence follows (after a gap, never back)
        got = pcm_of(at_once)
        assert (got[:30 * 480, 0] == beep).all() and (got[:30 * 480, 1] == beep).all()
        assert not got[30 * 480:].any()  # then silence, which pushes the beep's end through
        late = {c.latency_cap: c.late_start for c in server._core.audio.channels}
        assert late == {True: 30, False: 0}
        assert {c.latency_cap: c.settling for c in server._core.audio.channels} == {True: 0, False: 0}
        # A long sound: still going when settling ends, so its start stays left out. Queued
        # whole at once, so the server's pump alone decides when its packets go.
        monkeypatch.setattr("spicestream.audio.output.MAX_QUEUED_S", 3.0)
        server.audio.write(tone(440.0, 0, 2 * RATE))
        gtk.wait_for(lambda c: len(playback(c, SERVER.PLAYBACK_DATA)) >= 30 + 60, timeout=10,
                     what="the long tone after its first 1.2 s")
        later = playback(gtk, SERVER.PLAYBACK_DATA)[30:]
        second = playback(gtk, SERVER.PLAYBACK_START)[1].time
        assert len({d.time for d in later}) == len(later)  # one stamp each: none were held
        assert min(d.time for d in later) - second >= SETTLE_MS
        assert {c.latency_cap: c.late_start for c in server._core.audio.channels} == {True: 30, False: 0}


def test_the_pump_wakes_once_a_packet_not_on_a_fixed_tick(server, monkeypatch):
    """A second of sound queued at once and the quiet until STOP: the pump runs about once a
    packet (a 5 ms tick ran twice a packet and 60 times in the 300 ms before STOP)."""
    monkeypatch.setattr("spicestream.audio.output.MAX_QUEUED_S", 3.0)
    pump = server._core.audio
    with audio_client(server, opus=False) as client:
        runs = pump.runs
        server.audio.write(tone(440.0, 0, RATE))
        client.wait_for(lambda c: playback(c, SERVER.PLAYBACK_STOP), timeout=10, what="the stream's end")
        runs = pump.runs - runs
    assert pump.packets == 100 and pump.filled == 0  # spice-gtk takes no silence
    assert runs <= 1.2 * pump.packets + 5, runs


def test_sound_right_after_a_late_start_burst_is_drained_by_the_overlap(server, monkeypatch):
    """A short sound that started a stream reaches spice-gtk as a burst when settling ends;
    sound that follows while the client still plays it queues behind it. The drain leaves out
    that overlap too, quiet packets only, so the latency of what follows is as without it."""
    monkeypatch.setattr("spicestream.audio.output.STOP_AFTER_MS", 3000)  # past settling
    beep = (np.sin(2 * np.pi * 440 * np.arange(30 * 480) / RATE) * 8000).astype(np.int16)
    with audio_client(server, opus=False) as gtk, audio_client(server, opus=False, latency=False) as html5:
        server.audio.write(beep)
        gtk.wait_for(lambda c: len(playback(c, SERVER.PLAYBACK_DATA)) >= 30, timeout=10, what="the beep")
        with SoundThenSilence(server, [(0.5, 1.0), (0.0, 1.0), (0.5, 0.5)]):
            for client in (gtk, html5):
                client.wait_for(lambda c: playback(c, SERVER.PLAYBACK_STOP), timeout=20, what="the stream's end")
        channel = next(c for c in server._core.audio.channels if c.latency_cap)
        assert channel.late_start == 30 and channel.overlap >= 1
        assert channel.drained == (PLAYBACK_DELAY_MS - CLIENT_BUFFER_MS) // PACKET_MS + channel.overlap
    after = playback(gtk, SERVER.PLAYBACK_DATA)[30:]  # what followed the burst
    whole = {d.time: d.data for d in playback(html5, SERVER.PLAYBACK_DATA)
             if after[0].time <= d.time <= after[-1].time}  # not the silence spice-html5 gets last
    left_out = set(whole) - {d.time for d in after}
    assert len(left_out) == channel.drained and all(not any(whole[t]) for t in left_out)


def test_a_stalled_client_keeps_only_the_newest_packets(server):
    with audio_client(server) as stalled, audio_client(server) as healthy:
        stalled.stall(Ch.PLAYBACK)
        with TonePlayer(server, 300.0, seconds=3.0):
            healthy.wait_for(lambda c: playback(c, SERVER.PLAYBACK_STOP), timeout=20, what="the end")
        channels = {c.conn.peer: c for c in server._core.audio.channels}
        assert len(channels) == 2
        for channel in channels.values():
            assert len(channel.pending) <= channel.pending.maxlen
        port = healthy.channels[Ch.PLAYBACK].writer.get_extra_info("sockname")[1]
        healthy_channel = next(c for peer, c in channels.items() if peer.endswith(f":{port}"))
        assert len(playback(healthy, SERVER.PLAYBACK_DATA)) == 300 - healthy_channel.settling - healthy_channel.drained


def test_volume_and_mute_reach_clients_with_the_volume_cap(server):
    with audio_client(server) as client:
        server.audio.set_volume(0.5, muted=True)
        client.wait_for(lambda c: any(m.volume == (32768, 32768) for m in playback(c, SERVER.PLAYBACK_VOLUME)),
                        what="the volume")
        assert playback(client, SERVER.PLAYBACK_MUTE)[-1].mute == 1


def test_microphone_opus_and_raw_reach_on_audio_in(server):
    got = queue.Queue()
    server.on_audio_in = lambda samples, rate, channels: got.put((samples, rate, channels))
    for opus in (True, False):
        with audio_client(server, opus=opus, record=True) as client:
            client.wait_for(lambda c: any(type(m) is SERVER.RECORD_START for m in c.messages), what="record start")
            mode = AudioDataMode.OPUS if opus else AudioDataMode.RAW
            client.send(Ch.RECORD, CLIENT.RECORD_MODE(0, mode, b""))
            client.send(Ch.RECORD, CLIENT.RECORD_START_MARK(0))
            encoder = OpusEncoder()
            for i in range(50):
                pcm = np.repeat((tone(880.0, i * 480, 480) * 32767).astype(np.int16)[:, None], 2, axis=1)
                client.send(Ch.RECORD, CLIENT.RECORD_DATA(0, encoder.encode(pcm) if opus else pcm.tobytes()))
            pieces = [got.get(timeout=10) for _ in range(50)]
            assert all(rate == RATE and channels == 2 for _, rate, channels in pieces)
            heard = np.concatenate([p for p, _, _ in pieces])[:, 0] / 32768.0
            assert abs(peak_hz(heard[960:]) - 880) < 5, opus
    server.on_audio_in = None


def test_hostile_microphone_data_closes_only_that_client(server, caplog):
    server.on_audio_in = lambda *a: None
    with audio_client(server, record=True) as good:
        for bad_message in (CLIENT.RECORD_MODE(0, 7, b""),
                            CLIENT.RECORD_DATA(0, b"\x01\x02\x03")):  # raw, not whole samples
            with audio_client(server, record=True) as bad:
                bad.wait_for(lambda c: any(type(m) is SERVER.RECORD_START for m in c.messages), what="start")
                bad.send(Ch.RECORD, bad_message)
                bad.wait_for(lambda c: Ch.RECORD in c.closed_channels, what="the bad client closed")
        with audio_client(server, record=True) as bad:
            bad.wait_for(lambda c: any(type(m) is SERVER.RECORD_START for m in c.messages), what="start")
            bad.send(Ch.RECORD, CLIENT.RECORD_MODE(0, AudioDataMode.OPUS, b""))
            bad.send(Ch.RECORD, CLIENT.RECORD_DATA(0, b"\xff" * 900))  # not an Opus packet
            bad.wait_for(lambda c: Ch.RECORD in c.closed_channels, what="the bad Opus client closed")
        assert Ch.RECORD not in good.closed_channels
        good.send(Ch.RECORD, CLIENT.RECORD_DATA(0, np.zeros((480, 2), np.int16).tobytes()))
        time.sleep(0.2)
        assert Ch.RECORD not in good.closed_channels
    server.on_audio_in = None


# -- remote-viewer -------------------------------------------------------------------------------------
def rms_windows(x: np.ndarray, ms: int = 5) -> np.ndarray:
    n = RATE * ms // 1000
    frames = x[: len(x) // n * n].reshape(-1, n)
    return np.sqrt((frames ** 2).mean(axis=1))


@pytest.mark.realclient
@pytest.mark.timeout(120)
@pytest.mark.skipif(not pulse.available() or bool(xclient.missing_tools()),
                    reason="needs pulseaudio, pactl, parec and remote-viewer under Xvfb")
def test_remote_viewer_plays_the_tone_without_gaps(server, tmp_path):
    with pulse.PulseServer(tmp_path / "pulse") as pa, xclient.XSession(800, 600, log_dir=tmp_path / "x") as x:
        x.env.update(pa.env)
        recording = tmp_path / "played.raw"
        recorder = pa.record(recording)
        try:
            with TonePlayer(server, 440.0) as player:
                viewer = x.start_viewer(f"spice://127.0.0.1:{server.port}")
                x.find_window(viewer)
                xclient.wait_until(lambda: os.path.getsize(recording) > 0 and
                                   np.abs(pulse.read_recording(recording)).max() > 0.1, 20, 0.2, "sound in the sink")
                heard_from = player.written
                while player.written < heard_from + 3 * RATE:  # 3 s of the tone, by what was written
                    time.sleep(0.05)
        finally:
            recorder.terminate()
            recorder.wait(5)
    left = pulse.read_recording(recording)[:, 0]
    sound = left[np.argmax(np.abs(left) > 0.1):]
    steady = sound[RATE // 2: RATE // 2 + 2 * RATE]  # 2 s, from half a second in
    assert len(steady) == 2 * RATE, f"only {len(sound) / RATE:.2f} s of sound recorded"
    assert abs(peak_hz(steady) - 440) <= 5
    quiet = rms_windows(steady) < 0.1  # the tone's RMS is 0.35
    longest, run = 0, 0
    for q in quiet:
        run = run + 1 if q else 0
        longest = max(longest, run)
    assert longest * 5 <= 30, f"a gap of {longest * 5} ms"


@pytest.mark.realclient
@pytest.mark.timeout(120)
@pytest.mark.skipif(not pulse.available() or bool(xclient.missing_tools()),
                    reason="needs pulseaudio, pactl, parec and remote-viewer under Xvfb")
def test_remote_viewer_plays_a_short_beep_that_starts_a_stream(server, tmp_path, monkeypatch):
    """A notification after a long silence: 300 ms that start a stream and end before the
    first SETTLE_MS do. remote-viewer plays it whole, SETTLE_MS late, instead of not at all."""
    monkeypatch.setattr("spicestream.audio.output.STOP_AFTER_MS", 3000)  # as in use: past settling
    beep = tone(440.0, 0, 30 * 480, level=0.5)
    with pulse.PulseServer(tmp_path / "pulse") as pa, xclient.XSession(800, 600, log_dir=tmp_path / "x") as x:
        x.env.update(pa.env)
        recording = tmp_path / "played.raw"
        recorder = pa.record(recording)
        try:
            viewer = x.start_viewer(f"spice://127.0.0.1:{server.port}")
            x.find_window(viewer)
            xclient.wait_until(lambda: server._core.audio.channels, 20, 0.1, "the viewer's playback channel")
            time.sleep(1.0)  # the channel's own start-up is not what is tested
            server.audio.write(beep)
            xclient.wait_until(lambda: [c.late_start for c in server._core.audio.channels] == [30], 10, 0.05,
                               "the beep sent when settling ended")
            time.sleep(1.5)  # played, and into the recording
        finally:
            recorder.terminate()
            recorder.wait(5)
    left = pulse.read_recording(recording)[:, 0]
    loud = rms_windows(left) > 0.1  # the beep's RMS is 0.35
    assert loud.sum() * 5 >= 250, f"only {loud.sum() * 5} ms of the 300 ms beep heard"
    heard = left[np.argmax(np.abs(left) > 0.1):][: RATE // 4]
    assert abs(peak_hz(heard) - 440) <= 8
