"""CPU per frame of the GStreamer encoder path at a steady frame rate, by thread; prints JSON.

    .venv/bin/python bench/encode_cpu.py [--element x264enc] [--size 640x360] [--fps 30]
                                         [--frames 450] [--repeat 8]

What the server pays per frame for `GstEncoder` alone (push into appsrc, colour conversion,
encoding, the appsink callback), without capture or network: bench/glass.py's content (moving
texture and frame-number strip, 60 distinct frames), fed at `--fps` paced by deadline, bit rate
fixed at 3 Mbit/s. CPU is read per thread from /proc/self/task over the paced window
(GStreamer's threads carry their element names: src:src converts, and encodes too where there
is no queue; queueN:src encodes behind a queue; pool-python is a second conversion thread).

Three ways to feed the encoder, alternated `--repeat` times (single runs here differ by up to
~15 %: compare over 8 or more):
  `libyuv`:       frames converted to I420 by libyuv as they are handed over, then
                  `appsrc ! encoder` (what I420 encoders get where yuv.py allows it);
  `videoconvert`: what gst_encoder.pipeline_description builds for this size without libyuv;
  `split`:        videoconvert on CONVERT_THREADS threads and a queue before the encoder.
Hand-offs matter as well as conversion: on this 2-core VM putting a thread to sleep and waking
it is dear (a Python loop of time.sleep(0.005) uses ~0.1 ms of CPU per turn), so a layout with
fewer threads per frame is cheaper for the same conversion and encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import glass  # noqa: E402
from glass_x11 import thread_cpu, thread_cpu_delta  # noqa: E402
from spicestream.video import gst_encoder, yuv  # noqa: E402
from spicestream.video.elements import BY_NAME  # noqa: E402

BIT_RATE = 3_000_000


def frames(width: int, height: int, count: int = 60) -> list:
    bases = glass.base_frames(width, height)
    out = []
    for k in range(count):
        f = bases[k % len(bases)].copy()
        for x0, y0 in glass.strip_origins(width, height):
            glass.paint_code(f, k, x0, y0)
        out.append(f)
    return out


def run(layout: str, element: str, width: int, height: int, fps: int, count: int, pictures) -> dict:
    original, converts = gst_encoder.pipeline_description, yuv.converts

    def describe(*args, **kwargs):
        return original(*args, **kwargs, split=True) if layout == "split" else original(*args, **kwargs)

    gst_encoder.pipeline_description = describe
    if layout != "libyuv":
        yuv.converts = lambda pixel_format: False
    done = threading.Semaphore(0)
    sizes: list[int] = []
    errors: list[str] = []
    try:
        encoder = gst_encoder.GstEncoder(BY_NAME[element], width, height, BIT_RATE,
                                         lambda f: (sizes.append(len(f.data)), done.release()),
                                         errors.append, fps=fps)
    finally:
        gst_encoder.pipeline_description, yuv.converts = original, converts
    if (encoder._i420 is not None) != (layout == "libyuv"):
        encoder.close()
        raise SystemExit(f"{element} at {width}x{height}: libyuv does not feed it here")
    try:
        for k in range(10):  # the pipeline's start-up is not what is measured
            encoder.encode(pictures[k % len(pictures)], k)
            done.acquire(timeout=10)
        sizes.clear()
        before, cpu0, t0 = thread_cpu(os.getpid()), time.process_time(), time.monotonic()
        refused = 0
        for k in range(count):
            time.sleep(max(0.0, t0 + k / fps - time.monotonic()))
            if not encoder.encode(pictures[k % len(pictures)], 100 + k):
                refused += 1
        deadline = time.monotonic() + 5
        while len(sizes) < count - refused and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu1, after = time.process_time(), thread_cpu(os.getpid())
    finally:
        encoder.close()
    def label(name: str) -> str:  # queues are numbered per pipeline: queue0, queue1...
        if name == "src:src":
            return "appsrc thread (converts; encodes too without a queue)"
        return "queue thread (encodes)" if name.startswith("queue") else name

    threads = thread_cpu_delta(before, after, count)
    return {"layout": layout, "cpu_ms_per_frame": round((cpu1 - cpu0) * 1000 / count, 3),
            "threads_ms_per_frame": {label(name): row["cpu_ms_per_frame"] for name, row in sorted(threads.items())},
            "frames": count, "refused": refused, "encoded": len(sizes),
            "kbytes_per_frame": round(sum(sizes) / 1000 / max(1, len(sizes)), 1), "errors": errors[:3]}


LAYOUTS = ("libyuv", "videoconvert", "split")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--element", default="x264enc")
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=450)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"which to run, comma-separated, of {','.join(LAYOUTS)}")
    args = parser.parse_args()
    layouts = [name.strip() for name in args.layouts.split(",")]
    if not layouts or any(name not in LAYOUTS for name in layouts):
        parser.error(f"--layouts: choose from {', '.join(LAYOUTS)}")
    width, height = (int(v) for v in args.size.split("x"))
    if not gst_encoder.element_exists(args.element):
        sys.exit(f"{args.element} is not installed")
    pictures = frames(width, height)
    runs = [run(layout, args.element, width, height, args.fps, args.frames, pictures)
            for _ in range(args.repeat) for layout in layouts]
    summary = {}
    for layout in layouts:
        values = [r["cpu_ms_per_frame"] for r in runs if r["layout"] == layout]
        summary[layout] = {"mean_cpu_ms_per_frame": round(sum(values) / len(values), 3),
                           "min": min(values), "max": max(values)}
    for layout in layouts:
        if "libyuv" in layouts and layout != "libyuv":
            summary[f"libyuv_over_{layout}"] = round(summary["libyuv"]["mean_cpu_ms_per_frame"]
                                                     / summary[layout]["mean_cpu_ms_per_frame"], 3)
    print(json.dumps({"element": args.element, "size": args.size, "fps": args.fps,
                      "bit_rate": BIT_RATE, "cores": os.cpu_count(), "summary": summary,
                      "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
