"""Encoder throughput and latency on the demo content; prints JSON.

    .venv/bin/python bench/encode.py [--frames N] [--sizes 1280x720,1920x1080] [--elements x264enc,...]

For each usable encoder (as probed here) and size: frames per second encoded with the
encoder's normal pipelining (up to `max_in_flight` frames inside, as fast as it goes);
encode latency p50/p95 (from encode() to the output callback) with frames arriving at a
steady 60 fps, and how many of those it had to refuse; bytes per frame; bytes copied in
Python per frame.
Frames are the full demo desktop (its video window moves), rendered before timing starts.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from spicestream.sources.demo import DemoScene
from spicestream.video.elements import BY_NAME
from spicestream.video.probe import probe_all

BIT_RATE = 8_000_000
PACED_FPS = 60


def make_encoder(result, width, height, on_frame, on_error):
    if result.backend == "spice":
        from spicestream.video.mjpeg import MjpegEncoder

        return MjpegEncoder(result.codec, width, height, BIT_RATE, on_frame, on_error)
    from spicestream.video.gst_encoder import GstEncoder

    return GstEncoder(BY_NAME[result.element], width, height, BIT_RATE, on_frame, on_error, fps=60)


def run(result, width, height, frames, count):
    done = threading.Condition()
    outputs, errors = [], []

    def on_frame(f):
        with done:
            outputs.append(f)
            done.notify()

    def on_error(message):
        with done:
            errors.append(message)
            done.notify()

    encoder = make_encoder(result, width, height, on_frame, on_error)
    try:
        for i in range(5):  # warm-up: first frames pay pipeline start-up
            while not encoder.encode(frames[i % len(frames)], i + 1):
                time.sleep(0.001)
        with done:
            done.wait_for(lambda: len(outputs) >= 5 or errors, timeout=30)
        outputs.clear()
        start = time.perf_counter()
        submitted = 0
        while submitted < count and not errors:
            if encoder.encode(frames[submitted % len(frames)], submitted + 100):
                submitted += 1
            else:
                with done:
                    done.wait(timeout=1)
        with done:
            done.wait_for(lambda: len(outputs) >= submitted or errors, timeout=60)
        elapsed = time.perf_counter() - start
        throughput = outputs[:]
        # Latency at a steady frame rate (what a client sees), not under saturation, where
        # it would include the wait behind the frame already inside.
        outputs.clear()
        period = 1 / PACED_FPS
        next_at = time.perf_counter()
        refused = 0
        for i in range(count):
            next_at += period
            refused += not encoder.encode(frames[i % len(frames)], i + 1000)
            time.sleep(max(0.0, next_at - time.perf_counter()))
        with done:
            done.wait_for(lambda: len(outputs) >= count - refused or errors, timeout=60)
    finally:
        encoder.close()
    if errors:
        return {"error": errors[0]}
    latency = np.array([f.encode_ms for f in outputs])
    return {
        "fps": round(len(throughput) / elapsed, 1),
        f"paced_{PACED_FPS}fps_dropped": refused,
        "latency_ms_p50": round(float(np.percentile(latency, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(latency, 95)), 2),
        "bytes_per_frame": int(np.mean([len(f.data) for f in throughput])),
        "copied_bytes_per_frame": int(np.mean([f.copied_bytes for f in throughput + outputs])),
        "key_frames": int(sum(f.key for f in throughput)),
        "frames": len(throughput),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--sizes", default="1280x720,1920x1080")
    parser.add_argument("--elements", default="", help="comma-separated subset of elements")
    args = parser.parse_args()
    wanted = set(filter(None, args.elements.split(",")))
    results = [r for r in probe_all() if r.usable and (not wanted or r.element in wanted)]
    report = {"bit_rate": BIT_RATE, "frames": args.frames, "results": []}
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        scene = DemoScene(width, height)
        frames = [scene.render(i / 30)[0].copy() for i in range(16)]
        for result in results:
            row = {"codec": result.codec.label, "encoder": result.backend, "element": result.element,
                   "size": size}
            row.update(run(result, width, height, frames, args.frames))
            report["results"].append(row)
            print(json.dumps(row), flush=True, file=__import__("sys").stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
