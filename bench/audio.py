"""Opus encoding cost per 10 ms packet (48 kHz stereo): libopus through ctypes, as
spicestream uses it, against GStreamer's opusenc behind appsrc/appsink (the other choice the
issue named). Prints JSON.

    .venv/bin/python bench/audio.py [--packets 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RATE, PIECE = 48000, 480


def pcm_packets(n: int) -> list[np.ndarray]:
    t = np.arange(n * PIECE) / RATE
    x = (np.sin(2 * np.pi * 440 * t) * 0.3 + np.sin(2 * np.pi * 1234 * t) * 0.1) * 32767
    x = np.repeat(x.astype(np.int16)[:, None], 2, axis=1)
    return [x[i * PIECE:(i + 1) * PIECE] for i in range(n)]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_ctypes(packets) -> dict:
    from spicestream.audio.opus import OpusEncoder

    encoder = OpusEncoder()
    c0, t0 = cpu(), time.perf_counter()
    out = [encoder.encode(p) for p in packets]
    c1, t1 = cpu(), time.perf_counter()
    return {"cpu_us_per_packet": round((c1 - c0) / len(packets) * 1e6, 1),
            "wall_us_per_packet": round((t1 - t0) / len(packets) * 1e6, 1),
            "bytes_per_packet": round(sum(map(len, out)) / len(out), 1), "latency_packets": 0}


def bench_gstreamer(packets) -> dict:
    import gi

    gi.require_version("Gst", "1.0")
    from gi.repository import Gst

    Gst.init(None)
    pipeline = Gst.parse_launch(
        "appsrc name=src format=time caps=audio/x-raw,format=S16LE,rate=48000,channels=2,layout=interleaved "
        "! opusenc frame-size=10 bitrate=96000 audio-type=restricted-lowdelay ! appsink name=sink sync=false")
    src, sink = pipeline.get_by_name("src"), pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    out, waits = [], []
    c0, t0 = cpu(), time.perf_counter()
    for i, p in enumerate(packets):
        buf = Gst.Buffer.new_wrapped(p.tobytes())
        buf.pts, buf.duration = i * 10 * Gst.MSECOND, 10 * Gst.MSECOND
        pushed = time.perf_counter()
        src.emit("push-buffer", buf)
        sample = sink.emit("try-pull-sample", Gst.SECOND)  # the packet for this input
        waits.append(time.perf_counter() - pushed)
        if sample is not None:
            out.append(sample.get_buffer().get_size())
    c1, t1 = cpu(), time.perf_counter()
    pipeline.set_state(Gst.State.NULL)
    return {"cpu_us_per_packet": round((c1 - c0) / len(packets) * 1e6, 1),
            "wall_us_per_packet": round((t1 - t0) / len(packets) * 1e6, 1),
            "push_to_packet_us_p50": round(float(np.median(waits)) * 1e6, 1),
            "bytes_per_packet": round(sum(out) / max(1, len(out)), 1), "packets_out": len(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=3000)
    args = parser.parse_args()
    packets = pcm_packets(args.packets)
    result = {"bench": "audio-opus", "packets": args.packets, "machine_cores": os.cpu_count(),
              "libopus_ctypes": bench_ctypes(packets), "gstreamer_opusenc": bench_gstreamer(packets)}
    a, b = result["libopus_ctypes"]["cpu_us_per_packet"], result["gstreamer_opusenc"]["cpu_us_per_packet"]
    result["gstreamer_cpu_ratio"] = round(b / a, 2) if a else None
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
