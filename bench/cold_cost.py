"""What per-frame Python costs when it runs once a frame, against the same code in a loop; JSON.

    .venv/bin/python bench/cold_cost.py [--calls 300] [--gap-ms 33] [--repeat 3]

Each workload is a piece of what spicestream runs for every captured or encoded frame:
  `display_update`: Display.update of a 640x360 frame with one damage rectangle, a stream
      running over the whole surface (what the X11 source does per capture);
  `h264_follow_up`: SkipFrames.observe + after on one 640x360 x264 frame (the encoder's
      callback, per encoded frame; video/h264skip.py).
Each is timed in CPU (time.thread_time) two ways, the calls paced by deadline:
  `hot_us`: back to back;
  `paced_us`: one call every `--gap-ms`, the thread spinning (not sleeping) in between, so the
      CPU never idles and the only difference is time passing between calls.
On a VM whose core is shared, what one frame's Python touched is mostly gone from the caches
by the next frame: `paced_us / hot_us` says by how much that multiplies its cost. That factor
is why a few hundred microseconds of Python per frame are visible next to a C server
(bench/glass_x11.py) although the same code run in a loop looks cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spicestream.display.surface import Display  # noqa: E402
from spicestream.video.h264skip import SkipFrames  # noqa: E402


def display_update():
    display = Display(640, 360, "all")
    display.attach()
    frames = [np.zeros((360, 640, 4), np.uint8) for _ in range(2)]
    for k in range(40):  # until the stream region is there
        display.update(frames[k % 2], [(0, 0, 640, 360)])
    assert display.stream_region is not None
    state = {"k": 0}

    def call():
        state["k"] += 1
        display.update(frames[state["k"] % 2], [(0, 0, 640, 360)])
    return call


def h264_follow_up():
    from spicestream.video.elements import BY_NAME
    from spicestream.video.encoder import encode_sync
    from spicestream.video.gst_encoder import GstEncoder
    encoder = GstEncoder(BY_NAME["x264enc"], 640, 360, 2_000_000, lambda f: None, lambda m: None, 30)
    try:
        y = np.arange(360)[:, None, None]
        units = [encode_sync(encoder, np.broadcast_to(((y + 5 * k) % 256).astype(np.uint8),
                                                      (360, 640, 4)).copy(), k + 1).data
                 for k in range(60)]
    finally:
        encoder.close()
    skips = SkipFrames()
    state = {"k": 0}

    def call():
        skips.observe(units[state["k"] % len(units)])
        skips.after()
        state["k"] += 1
    return call


WORKLOADS = {"display_update": display_update, "h264_follow_up": h264_follow_up}


def timed(call, calls: int, gap_s: float) -> float:
    """Mean CPU microseconds per call, one call every gap_s (0: back to back)."""
    used = 0.0
    deadline = time.perf_counter()
    for _ in range(calls):
        deadline += gap_s
        while time.perf_counter() < deadline:
            pass
        start = time.thread_time()
        call()
        used += time.thread_time() - start
    return used / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=33.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    results = {}
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            parser.error(f"--workloads: unknown {name!r}")
        call = WORKLOADS[name]()
        timed(call, 200, 0.0)  # warm up
        hot, paced = [], []
        for _ in range(args.repeat):
            hot.append(timed(call, args.calls * 5, 0.0))
            paced.append(timed(call, args.calls, args.gap_ms / 1000))
        results[name] = {"hot_us": round(statistics.median(hot), 1),
                         "paced_us": round(statistics.median(paced), 1),
                         "paced_over_hot": round(statistics.median(paced) / statistics.median(hot), 1),
                         "runs": {"hot_us": [round(v, 1) for v in hot],
                                  "paced_us": [round(v, 1) for v in paced]}}
    print(json.dumps({"metric": "CPU microseconds per call (time.thread_time), median of repeats",
                      "gap_ms": args.gap_ms, "cores": os.cpu_count(), "workloads": results}, indent=1))


if __name__ == "__main__":
    main()
