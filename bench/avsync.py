"""A/V sync with a real client: the application makes a click and a white flash at the same
instant every second; remote-viewer (under Xvfb, its sound into a PulseAudio null sink)
shows and plays them; we read both back and print JSON.

    .venv/bin/python bench/avsync.py [--seconds 20]

- The producer writes sound in 10 ms pieces paced by deadline (silence between clicks, so the
  stream never stops) and, at each whole second, writes a 10 ms 2 kHz click and draws a
  white frame in the same step; it records that moment (monotonic).
- Video: a thread reads a 16x16 patch in the middle of the client's window off its Xvfb
  (XGetImage, as fast as it can) and stamps when it turns white.
- Audio: `parec` records the null sink's monitor in 5 ms blocks; a thread stamps each block
  as it arrives and dates the click's first loud sample within it (the recording adds its
  own few ms of buffering to the audio figure, not removed).
- Reported: glass-to-glass latency of the flash, ear latency of the click (written to heard),
  and their difference per event (offset > 0: sound after picture). A first phase without
  sound gives the flash latency with spice-gtk's clock driven by the main channel alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

W, H = 320, 240
RATE = 48000
PIECE = 480


def frame(level: int) -> np.ndarray:
    f = np.full((H, W, 4), level, np.uint8)
    f[..., 3] = 255
    return f


class Producer(threading.Thread):
    def __init__(self, server, sound: bool):
        super().__init__(daemon=True)
        self.server, self.sound = server, sound
        self.stop = threading.Event()
        self.events: list[float] = []  # monotonic time of each click + flash

    def run(self):
        click = (np.sin(2 * np.pi * 2000 * np.arange(PIECE) / RATE) * 0.8).astype(np.float32)
        silence = np.zeros(PIECE, np.float32)
        dark, white = frame(40), frame(255)
        start = time.monotonic()
        n = 0
        flash_off = None
        while not self.stop.is_set():
            piece_index = n // PIECE
            event = piece_index % 100 == 50  # every second, half a second in
            if event:
                now = time.monotonic()
                if self.sound:
                    self.server.audio.write(click)
                self.server.display.update(white)
                self.events.append(now)
                flash_off = piece_index + 10
            elif self.sound:
                self.server.audio.write(silence)
            if piece_index == flash_off:
                self.server.display.update(dark)
            n += PIECE
            self.stop.wait(max(0.0, start + n / RATE - time.monotonic()))


class ScreenWatch(threading.Thread):
    def __init__(self, display: str, x: int, y: int):
        super().__init__(daemon=True)
        self.display, self.x, self.y = display, x, y
        self.stop = threading.Event()
        self.onsets: list[float] = []

    def run(self):
        import xcffib
        import xcffib.xproto as xp

        conn = xcffib.connect(display=self.display)
        root = conn.get_setup().roots[0].root
        bright = False
        while not self.stop.is_set():
            reply = conn.core.GetImage(xp.ImageFormat.ZPixmap, root, self.x, self.y, 16, 16, 0xFFFFFFFF).reply()
            t = time.monotonic()
            level = np.frombuffer(reply.data.buf(), np.uint8).reshape(16, 16, 4)[..., :3].mean()
            if level > 200 and not bright:
                self.onsets.append(t)
            bright = level > 200
        conn.disconnect()


class EarWatch(threading.Thread):
    BLOCK = 240  # 5 ms

    def __init__(self, pa):
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(["parec", "-d", f"{pa.sink}.monitor", "--format=s16le", "--rate=48000",
                                      "--channels=2", "--raw", "--latency-msec=5"],
                                     stdout=subprocess.PIPE, env=pa.client_env())
        self.onsets: list[float] = []
        self.samples = 0
        self.peak = 0.0

    def run(self):
        loud_until = 0.0
        while True:
            data = self.proc.stdout.read(self.BLOCK * 4)
            t = time.monotonic()
            if not data:
                break
            x = np.frombuffer(data, "<i2")[0::2].astype(np.float64) / 32768
            self.samples += len(x)
            self.peak = max(self.peak, float(np.abs(x).max()))
            hits = np.flatnonzero(np.abs(x) > 0.3)
            if len(hits) and t > loud_until:
                # The block's last sample arrived now: date the first loud one back from it.
                self.onsets.append(t - (len(x) - hits[0]) / RATE)
                loud_until = t + 0.3

    def close(self):
        self.proc.terminate()
        self.proc.wait(5)


def pair(events: list[float], seen: list[float], limit: float = 0.5) -> list[float]:
    """Latency of each event: the first sighting after it and within `limit` s."""
    out = []
    for e in events:
        after = [s - e for s in seen if 0 <= s - e < limit]
        if after:
            out.append(min(after))
    return out


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.array(values) * 1000
    return {"n": len(a), "p50_ms": round(float(np.median(a)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "min_ms": round(float(a.min()), 1), "max_ms": round(float(a.max()), 1)}


def phase(server, x, pa, window, seconds: float, sound: bool) -> dict:
    gx, gy, gw, gh = x.geometry(window)
    screen = ScreenWatch(x.display, gx + gw // 2 - 8, gy + gh // 2 - 8)
    ear = EarWatch(pa) if sound else None
    producer = Producer(server, sound)
    screen.start()
    if ear:
        ear.start()
    producer.start()
    time.sleep(seconds)
    producer.stop.set()
    producer.join(5)
    time.sleep(0.6)
    screen.stop.set()
    screen.join(5)
    if ear:
        ear.close()
        ear.join(5)
    events = producer.events[1:]  # the first one may fall before the client's stream settles
    video = pair(events, screen.onsets)
    out = {"events": len(events), "video_glass_to_glass": summary(video)}
    if sound:
        audio = pair(events, ear.onsets)
        offsets = [a - v for e in events for a in pair([e], ear.onsets) for v in pair([e], screen.onsets)]
        out.update(
                   recorded_s=ear.samples / RATE, recorded_peak=ear.peak, ear_onsets=len(ear.onsets),
                   audio_latency=summary(audio), av_offset_audio_minus_video=summary(offsets),
                   audio_latency_per_event_ms=[round(a * 1000, 1) for a in audio],
                   audio_stats=server.stats_audio() if hasattr(server, "stats_audio") else server._core.audio.stats())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    import pulse
    import spicestream
    import xclient

    result = {"bench": "avsync", "machine_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        server = spicestream.Server(port=0, width=W, height=H).start()
        server.display.update(frame(40))
        try:
            with pulse.PulseServer(Path(tmp) / "pulse") as pa, xclient.XSession(800, 600, log_dir=Path(tmp) / "x") as x:
                x.env.update(pa.env)
                viewer = x.start_viewer(f"spice://127.0.0.1:{server.port}", "--zoom=100")
                window = x.find_window(viewer)
                time.sleep(2)
                result["without_sound"] = phase(server, x, pa, window, args.seconds / 2, sound=False)
                result["with_sound"] = phase(server, x, pa, window, args.seconds, sound=True)
        finally:
            server.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
