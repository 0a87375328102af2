"""An X server's cost per whole-window PutImage, started the default way and as `spicestream
run` starts it (with X_SERVER_MALLOC_TUNABLES); prints JSON.

    .venv/bin/python bench/xserver_requests.py [--size 640x360] [--count 300] [--servers xvfb,xorg]

For each X server (spicestream.session.PrivateXServer, Xvfb or Xorg with the dummy driver) and
each way of starting it: one X client draws its window whole `count` times, one PutImage
(BIG-REQUESTS) and one round trip each, after 10 to warm up. Reported per request: the X
server's CPU (utime+stime from /proc/PID/stat) and its minor page faults. No spicestream
server is involved: this is the X server's own cost of reading and drawing the requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # glass_x11.cpu_seconds
sys.path.insert(0, str(HERE.parent / "tests"))  # helpers.WindowImages



def cpu_and_faults(pid: int) -> tuple[float, int]:
    from glass_x11 import cpu_seconds

    from spicestream.sources.xpages import minor_faults

    return cpu_seconds(pid, children=False), minor_faults(pid)


def measure(kind: str, started: str, size: tuple[int, int], count: int, workdir: Path) -> dict:
    from helpers import WindowImages

    from spicestream.session import PrivateXServer

    server = PrivateXServer(kind, size, workdir)
    if started == "default":
        server.environment = lambda: {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    server.start()
    try:
        images = WindowImages(server.display, *size)
        image = bytes(range(256)) * (size[0] * size[1] * 4 // 256)
        try:
            for _ in range(10):
                images.put(image)
                images.round_trip()
            cpu0, faults0 = cpu_and_faults(server.proc.pid)
            for _ in range(count):
                images.put(image)
                images.round_trip()
            cpu1, faults1 = cpu_and_faults(server.proc.pid)
        finally:
            images.close()
    finally:
        server.stop()
    return {"cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / count, 3),
            "minor_faults_per_request": round((faults1 - faults0) / count, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--servers", default="xvfb,xorg", help="comma-separated: xvfb, xorg")
    args = parser.parse_args()
    try:
        size = tuple(int(v) for v in args.size.split("x"))
        if len(size) != 2 or min(size) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"bad --size {args.size!r}: WxH")
    kinds = [k for k in args.servers.split(",") if k]
    for kind in kinds:
        if kind not in ("xvfb", "xorg"):
            parser.error(f"bad server {kind!r}: xvfb or xorg")
    if args.count < 1:
        parser.error("--count must be at least 1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="xserver-requests-") as tmp:
        for kind in kinds:
            results[kind] = {}
            for started in ("default", "spicestream run"):
                try:
                    results[kind][started] = measure(kind, started, size, args.count, Path(tmp))
                except Exception as exc:  # an X server that is not installed is a result too
                    results[kind][started] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"metric": "X server CPU ms and minor page faults per whole-window PutImage",
                      "size": args.size, "count": args.count, "cores": os.cpu_count(),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
