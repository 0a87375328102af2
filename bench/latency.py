"""Latency from `display.update` to the frame's last byte written to the socket; prints JSON.

    .venv/bin/python bench/latency.py [--seconds 8] [--cases h264:1280x720:30,...]

A server streams full-screen moving content (rendered before timing starts) to the headless
test client over loopback. For every stream frame the server records the monotonic time of
the `display.update` that produced it and the time its STREAM_DATA went to the socket; a frame
counts only if the socket took all of it at once (otherwise its last byte left later and the
sample would flatter us: those are reported as `not_written_at_once`). Percentiles over the
frames after the first second.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

import spicestream
from spicestream.protocol.constants import DisplayCap
from spicestream.testing.client import TestClient

CAPS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
        DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_H264)
CODECS = {"h264": "gstreamer:h264", "mjpeg": "spice:mjpeg", "vp8": "gstreamer:vp8"}
DEFAULT_CASES = [f"{c}:{s}:{f}" for c in ("h264", "mjpeg") for s in ("1280x720", "1920x1080")
                 for f in (30, 60)]


def frames_for(width: int, height: int, count: int = 8) -> list[np.ndarray]:
    """Moving, textured content that is not trivial to encode (a video-like scroll)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (-(-height // 16), -(-width // 16), 4), dtype=np.uint8)
    texture = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)[:height, :width]
    texture[..., 3] = 255
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    return [np.ascontiguousarray(np.roll(texture, i * 12, axis=1)
                                 + (y * 40 * np.sin(i / 3)).astype(np.uint8)[..., None])
            for i in range(count)]


def run_case(codec: str, width: int, height: int, fps: int, seconds: float) -> dict:
    server = spicestream.Server(port=0, width=width, height=height, video_codecs=CODECS[codec],
                                streaming_video="all").start()
    frames = frames_for(width, height)
    stop = threading.Event()

    def play():
        # The application says what changed (the whole screen), as a video player would;
        # otherwise the tile comparison runs on every 1080p frame.
        period, next_at, i, damage = 1 / fps, time.monotonic(), 0, [(0, 0, width, height)]
        while not stop.is_set():
            server.display.update(frames[i % len(frames)], damage)
            i += 1
            next_at += period
            stop.wait(max(0.0, next_at - time.monotonic()))

    player = threading.Thread(target=play, daemon=True)
    player.start()
    client = TestClient("127.0.0.1", server.port, display_caps=CAPS, decode_streams=False).connect()
    try:
        deadline = time.monotonic() + 20
        while not (server.frame_timings() and server.frame_timings()[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # past the stream's start-up
        t0 = time.monotonic()
        collected: dict[int, dict] = {}
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            for entry in server.frame_timings()[0]:
                if entry["capture"] >= t0 and "written" in entry:
                    collected[entry["stamp"]] = entry
        stats = server.stats()["clients"][0]["streams"]["active"]
    finally:
        stop.set()
        player.join(5)
        client.close()
        server.stop()
    at_once = [e for e in collected.values() if e["buffered"] == 0]
    lat = np.array([(e["written"] - e["capture"]) * 1000 for e in at_once]) if at_once else np.zeros(1)
    return {
        "codec": codec, "size": f"{width}x{height}", "fps": fps, "frames": len(collected),
        "not_written_at_once": len(collected) - len(at_once),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "encode_ms_p95": round(stats["encode_ms_p95"], 2),
        "dropped": stats["dropped"],
        "copied_bytes_per_frame": stats["copied_bytes_per_frame"],
        "bit_rate": stats["bit_rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="codec:WxH:fps entries, comma-separated")
    args = parser.parse_args()
    results = []
    for case in args.cases.split(","):
        codec, size, fps = case.split(":")
        width, height = (int(v) for v in size.split("x"))
        row = run_case(codec, width, height, int(fps), args.seconds)
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"metric": "display.update -> last byte of the frame written to the socket",
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
