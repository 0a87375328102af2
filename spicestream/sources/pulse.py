"""The desktop's sound, through PulseAudio (or PipeWire's pulse server), with GStreamer.

`PulseBridge(server, source)`:
  - playback: `pulsesrc` records SOURCE (default: the monitor of the default sink, i.e. what
    the desktop's applications play) in 10 ms buffers and writes them to `server.audio` as a
    live source (what a stall delays is dropped, not played late); digital silence is not
    written, so a quiet desktop lets the stream stop and costs nothing;
  - microphone: a null sink named MIC_SINK is loaded (pactl); its monitor is the source the
    desktop's applications record from ("SPICE client microphone"), and what clients record
    (`server.on_audio_in`) is played into it through `appsrc ! pulsesink`. Unloaded on close.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading

import numpy as np

log = logging.getLogger("spicestream.pulse")

MIC_SINK = "spicestream_mic"
SILENCE = 1  # |sample| at or below this is digital silence


class PulseError(RuntimeError):
    pass


class PulseBridge:
    def __init__(self, server, source: str | None = None, pulse_server: str | None = None,
                 microphone: bool = True):
        from ..gstreamer import load

        Gst, _ = load("Gst", "GstApp")
        self.Gst = Gst
        self.server = server
        self.pulse_server = pulse_server or os.environ.get("PULSE_SERVER")
        self.source = source or "@DEFAULT_MONITOR@"
        self.captured = self.silent = 0  # buffers
        self._mic_module: str | None = None
        self._lock = threading.Lock()
        server_prop = f' server="{self.pulse_server}"' if self.pulse_server else ""
        self.capture = Gst.parse_launch(
            f'pulsesrc name=src device="{self.source}"{server_prop} buffer-time=200000 latency-time=10000 '
            "! audio/x-raw,format=S16LE,rate=48000,channels=2,layout=interleaved "
            "! appsink name=sink emit-signals=true sync=false max-buffers=8 drop=true")
        self.capture.get_by_name("sink").connect("new-sample", self._sample)
        if self.capture.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            raise PulseError(f"cannot record {self.source} from PulseAudio")
        self.playback = None
        if microphone:
            self._start_microphone(server_prop)
        log.info("desktop sound from %s%s", self.source,
                 f"; clients' microphones into {MIC_SINK}.monitor" if microphone else "")

    # -- what the desktop plays -> clients ---------------------------------------------------
    def _sample(self, sink):
        sample = sink.emit("pull-sample")
        buffer = sample.get_buffer()
        ok, info = buffer.map(self.Gst.MapFlags.READ)
        if not ok:
            return self.Gst.FlowReturn.OK
        try:
            pcm = np.frombuffer(info.data, "<i2").reshape(-1, 2).copy()
        finally:
            buffer.unmap(info)
        self.captured += 1
        if len(pcm) and np.abs(pcm).max() > SILENCE:
            # live: after a stall the burst is dropped down to a few packets, not played late
            self.server.audio.write(pcm, 48000, live=True)
        else:
            self.silent += 1
        return self.Gst.FlowReturn.OK

    # -- clients' microphones -> the desktop -----------------------------------------------------
    def _pactl(self, *args) -> str:
        env = dict(os.environ)
        if self.pulse_server:
            env["PULSE_SERVER"] = self.pulse_server
        result = subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            raise PulseError(f"pactl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def _start_microphone(self, server_prop: str) -> None:
        self._mic_module = self._pactl(
            "load-module", "module-null-sink", f"sink_name={MIC_SINK}", "rate=48000", "channels=2",
            "sink_properties=device.description=SPICE-client-microphone")
        Gst = self.Gst
        self.playback = Gst.parse_launch(
            "appsrc name=src is-live=true format=time do-timestamp=true "
            "caps=audio/x-raw,format=S16LE,rate=48000,channels=2,layout=interleaved "
            f'! queue max-size-time=200000000 leaky=downstream ! pulsesink device={MIC_SINK}{server_prop} '
            "buffer-time=40000 latency-time=10000 sync=false")
        self.appsrc = self.playback.get_by_name("src")
        self.playback.set_state(Gst.State.PLAYING)
        self.server.on_audio_in = self._microphone

    def _microphone(self, samples, rate: int, channels: int) -> None:
        data = np.ascontiguousarray(samples, "<i2").tobytes()
        self.appsrc.emit("push-buffer", self.Gst.Buffer.new_wrapped(data))

    def close(self) -> None:
        Gst = self.Gst
        self.capture.set_state(Gst.State.NULL)
        if self.playback is not None:
            self.server.on_audio_in = None
            self.playback.set_state(Gst.State.NULL)
        if self._mic_module:
            try:
                self._pactl("unload-module", self._mic_module)
            except (PulseError, OSError, subprocess.TimeoutExpired) as exc:
                log.warning("could not unload the microphone sink: %s", exc)
            self._mic_module = None
