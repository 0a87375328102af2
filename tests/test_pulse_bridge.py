"""`--audio pulse`: what the desktop plays reaches clients, and a client's microphone becomes a
PulseAudio source the desktop's applications record from (a private PulseAudio server)."""

from __future__ import annotations

import queue
import subprocess
import time

import numpy as np
import pytest

import spicestream
from spicestream.audio.opus import OpusDecoder, OpusEncoder
from spicestream.protocol.constants import AudioDataMode, PlaybackCap, RecordCap
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.messages import CLIENT, SERVER
from spicestream.testing.client import TestClient

import pulse

pytest.importorskip("gi")
pytestmark = [pytest.mark.skipif(not pulse.available(), reason="needs pulseaudio, pactl, parec"),
              pytest.mark.timeout(90)]
RATE = 48000


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * RATE / len(x))


def test_desktop_sound_reaches_clients_and_microphones_reach_the_desktop(tmp_path):
    from spicestream.sources.pulse import MIC_SINK, PulseBridge

    with pulse.PulseServer(tmp_path / "pulse") as pa:
        server = spicestream.Server(port=0, width=64, height=64).start()
        server.display.update(np.zeros((64, 64, 4), np.uint8))
        bridge = PulseBridge(server, pulse_server=pa.env["PULSE_SERVER"])
        player = subprocess.Popen(["gst-launch-1.0", "-q", "audiotestsrc", "is-live=true", "freq=440", "volume=0.5",
                                   "!", f"pulsesink", f"server={pa.env['PULSE_SERVER']}", f"device={pa.sink}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        caps = {Ch.PLAYBACK: (PlaybackCap.OPUS,), Ch.RECORD: (RecordCap.OPUS,)}
        try:
            with TestClient("127.0.0.1", server.port, channels=(Ch.PLAYBACK, Ch.RECORD), channel_caps=caps) as client:
                # The desktop's tone, as Opus packets.
                client.wait_for(lambda c: sum(type(m) is SERVER.PLAYBACK_DATA for m in c.messages) >= 150,
                                timeout=30, what="the desktop's sound")
                decoder = OpusDecoder()
                pcm = np.concatenate([decoder.decode(m.data) for m in list(client.messages)
                                      if type(m) is SERVER.PLAYBACK_DATA][-100:])
                assert abs(peak_hz(pcm[:, 0] / 32768.0) - 440) < 5
                # A stall of the server's loop (0.5 s): the desktop's sound that piles up is
                # dropped down to a few packets, not sent late for as long as the stream runs.
                from spicestream.audio.output import LIVE_MAX_QUEUED_MS

                late_before = server.audio.stats()["late_samples"]
                server._loop.call_soon_threadsafe(time.sleep, 0.5)
                most = 0
                for _ in range(50):
                    most = max(most, server.audio.queued)
                    time.sleep(0.01)
                assert most <= LIVE_MAX_QUEUED_MS * RATE // 1000
                assert server.audio.stats()["late_samples"] > late_before
                # A client's microphone: an 880 Hz tone recorded from the desktop's new source.
                client.wait_for(lambda c: any(type(m) is SERVER.RECORD_START for m in c.messages), what="record start")
                recording = tmp_path / "mic.raw"
                recorder = subprocess.Popen(["parec", "-d", f"{MIC_SINK}.monitor", "--format=s16le", "--rate=48000",
                                             "--channels=2", "--raw"], stdout=open(recording, "wb"), env=pa.client_env())
                client.send(Ch.RECORD, CLIENT.RECORD_MODE(0, AudioDataMode.OPUS, b""))
                client.send(Ch.RECORD, CLIENT.RECORD_START_MARK(0))
                encoder = OpusEncoder()
                start = time.monotonic()
                for i in range(200):  # 2 s, paced by deadline
                    x = (np.sin(2 * np.pi * 880 * np.arange(i * 480, (i + 1) * 480) / RATE) * 16000).astype(np.int16)
                    client.send(Ch.RECORD, CLIENT.RECORD_DATA(0, encoder.encode(np.repeat(x[:, None], 2, axis=1))))
                    time.sleep(max(0.0, start + (i + 1) * 0.01 - time.monotonic()))
                time.sleep(0.5)
                recorder.terminate()
                recorder.wait(5)
                heard = pulse.read_recording(recording)[:, 0]
                loud = heard[np.abs(heard) > 0.05]
                assert len(loud) > RATE // 2, f"only {len(loud)} loud samples from the microphone source"
                assert abs(peak_hz(heard[np.argmax(np.abs(heard) > 0.05):][:RATE]) - 880) < 5
        finally:
            player.terminate()
            bridge.close()
            server.stop()
        modules = subprocess.run(["pactl", "list", "short", "modules"], env=pa.client_env(),
                                 capture_output=True, text=True).stdout
        assert MIC_SINK not in modules  # unloaded on close
