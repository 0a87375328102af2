"""How soon a client that joins sees a picture; prints JSON.

    .venv/bin/python bench/first_frame.py [--joiners 10] [--size 640x480]

Two cases, each with `--joiners` decoding headless clients joining one after the other:
  - `running`: an H.264 stream is playing at 30 fps to a first client; a joiner must get a key
    frame of the current picture from the running encoder;
  - `idle_scanout`: a DMA-BUF (memfd) scanout whose producer drew once and went idle; the
    joiner must get a frame although nothing new is drawn.
The figure is the time from the joiner's DISPLAY_INIT to the arrival of its first stream frame,
which must decode. Target: p95 under 100 ms on this machine (tests only check "at once").
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time

import numpy as np

import spicestream
from spicestream.display.scanout import fourcc
from spicestream.protocol.constants import DisplayCap
from spicestream.testing.client import TestClient

CAPS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
        DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_H264)


def picture(width: int, height: int, k: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    frame = np.zeros((height, width, 4), np.uint8)
    frame[..., 0] = (128 + 100 * np.sin(xx / 17 + k / 5)).astype(np.uint8)
    frame[..., 1] = (yy * 255 // height).astype(np.uint8)
    frame[..., 3] = 255
    return frame


def joiners(port: int, count: int) -> list[float]:
    waits = []
    for _ in range(count):
        with TestClient("127.0.0.1", port, display_caps=CAPS) as client:
            client.wait_for(lambda c: c.stream_log and c.stream_log[0]["picture"] is not None,
                            timeout=10, what="a decodable first frame")
            waits.append(client.stream_log[0]["arrival"] - client.display_init_sent)
    return waits


def summary(waits: list[float]) -> dict:
    ms = np.array(waits) * 1000
    return {"joiners": len(waits), "p50_ms": round(float(np.median(ms)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}


def running(width: int, height: int, count: int) -> dict:
    server = spicestream.Server(port=0, width=width, height=height, video_codecs="gstreamer:h264",
                                streaming_video="all").start()
    frames = [picture(width, height, k) for k in range(16)]
    stop = threading.Event()

    def play():
        period, next_at, k = 1 / 30, time.monotonic(), 0
        while not stop.is_set():
            server.display.update(frames[k % len(frames)], [(0, 0, width, height)])
            k += 1
            next_at += period
            stop.wait(max(0.0, next_at - time.monotonic()))

    player = threading.Thread(target=play, daemon=True)
    player.start()
    try:
        with TestClient("127.0.0.1", server.port, display_caps=CAPS, decode_streams=False) as first:
            first.wait_for(lambda c: len(c.stream_log) > 30, timeout=20, what="a running stream")
            return summary(joiners(server.port, count))
    finally:
        stop.set()
        player.join(5)
        server.stop()


def idle_scanout(width: int, height: int, count: int) -> dict:
    server = spicestream.Server(port=0, width=width, height=height, video_codecs="gstreamer:h264").start()
    stride = width * 4
    fd = os.memfd_create("scanout")
    os.ftruncate(fd, stride * height)
    buffer = mmap.mmap(fd, stride * height)
    try:
        np.frombuffer(buffer, np.uint8).reshape(height, width, 4)[:] = picture(width, height, 3)
        server.display.gl_scanout(fd, width, height, stride, fourcc("XR24"))
        server.display.gl_draw(0, 0, width, height, "once")
        time.sleep(0.5)  # idle from here on
        return summary(joiners(server.port, count))
    finally:
        server.stop()
        server.display.gl_release()
        buffer.close()
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joiners", type=int, default=10)
    parser.add_argument("--size", default="640x480")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    print(json.dumps({"size": args.size, "codec": "h264",
                      "running": running(width, height, args.joiners),
                      "idle_scanout": idle_scanout(width, height, args.joiners)}, indent=2))


if __name__ == "__main__":
    main()
