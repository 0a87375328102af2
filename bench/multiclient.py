"""Server CPU time with 1, 2, 4 and 8 clients on the same H.264 stream; prints JSON.

    .venv/bin/python bench/multiclient.py [--seconds 10] [--size 1280x720]

The server runs in a process of its own, playing full-screen moving content at 30 fps; the
headless test clients (not decoding) run in this process. For each client count, the
server's CPU time (user + system, from /proc) per second of wall time is measured after the
clients are streaming. `growth_per_client_pct` is the extra CPU each added client costs, as a
share of the one-client figure (the target: no more than 10 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from spicestream.protocol.constants import DisplayCap
from spicestream.testing.client import TestClient

CAPS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
        DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_H264)

SERVER = """
import sys, threading, time, numpy as np, spicestream
w, h = int(sys.argv[1]), int(sys.argv[2])
server = spicestream.Server(port=0, width=w, height=h, video_codecs="gstreamer:h264",
                            streaming_video="all", max_clients=16).start()
rng = np.random.default_rng(0)
small = rng.integers(0, 256, (h // 16, w // 16, 4), dtype=np.uint8)
texture = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)
frames = [np.ascontiguousarray(np.roll(texture, i * 8, axis=1)) for i in range(8)]
print(server.port, flush=True)
k, next_at = 0, time.monotonic()
while True:
    server.display.update(frames[k % len(frames)], [(0, 0, w, h)])
    k += 1
    next_at += 1 / 30
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--counts", default="1,2,4,8")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(width), str(height)], stdout=subprocess.PIPE,
                            text=True)
    results = []
    try:
        port = int(proc.stdout.readline())
        clients: list[TestClient] = []
        for count in (int(c) for c in args.counts.split(",")):
            while len(clients) < count:
                clients.append(TestClient("127.0.0.1", port, display_caps=CAPS, decode_streams=False,
                                          log_limit=1_000_000).connect())
            for c in clients:
                c.wait_for(lambda c: len(c.stream_log) > 30, timeout=30, what="stream frames")
            frames0 = [len(c.stream_log) for c in clients]
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            fps = [(len(c.stream_log) - f0) / (t1 - t0) for c, f0 in zip(clients, frames0)]
            results.append({"clients": count, "server_cpu_per_s": round((cpu1 - cpu0) / (t1 - t0), 3),
                            "min_client_fps": round(min(fps), 1)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        for c in clients:
            c.close()
    finally:
        proc.kill()
        proc.wait(5)
    base = results[0]["server_cpu_per_s"]
    for row in results[1:]:
        row["growth_per_client_pct"] = round(
            100 * (row["server_cpu_per_s"] - base) / (row["clients"] - 1) / base, 1)
    print(json.dumps({"size": args.size, "codec": "h264", "fps": 30, "results": results}, indent=2))


if __name__ == "__main__":
    main()
