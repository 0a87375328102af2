"""Decode SPICE stream payloads with GStreamer, as spice-gtk does (brief §6.1), for tests.

One `StreamDecoder` per stream: `decode(payload)` pushes one STREAM_DATA payload and returns
the decoded (h, w, 4) BGRx picture, or None if the decoder produced nothing in time.
"""

from __future__ import annotations

import numpy as np

from ..video.codec import Codec

try:
    from ..gstreamer import load

    (Gst,) = load("Gst")
except (ImportError, ValueError):
    Gst = None

# spice-gtk gives its appsrc just the media type (§6.1). For H.264 we also declare what every
# STREAM_DATA is, one access unit: without it h264parse waits for the next AU to end the
# current one, which would make each decoded picture one frame late in this lockstep client.
DECODERS = {
    Codec.MJPEG: "image/jpeg ! jpegdec",
    Codec.VP8: "video/x-vp8 ! vp8dec",
    Codec.VP9: "video/x-vp9 ! vp9dec",
    # One decoder thread: frame threading would hold each picture back by a frame or more.
    Codec.H264: "video/x-h264,stream-format=byte-stream,alignment=au ! h264parse ! avdec_h264 max-threads=1",
    Codec.H265: "video/x-h265 ! h265parse ! avdec_h265 max-threads=1",
}


class StreamDecoder:
    def __init__(self, codec: Codec):
        if Gst is None:
            raise RuntimeError("GStreamer (PyGObject) is not available")
        caps, chain = DECODERS[codec].split(" ! ", 1)
        self.pipeline = Gst.parse_launch(
            f"appsrc name=src is-live=true format=time caps={caps} ! {chain} ! videoconvert "
            f"! video/x-raw,format=BGRx ! appsink name=sink sync=false max-buffers=100")
        self.src = self.pipeline.get_by_name("src")
        self.sink = self.pipeline.get_by_name("sink")
        self.pipeline.set_state(Gst.State.PLAYING)
        self.count = 0
        self.errors = 0

    def decode(self, payload: bytes, timeout_s: float = 2.0) -> np.ndarray | None:
        buf = Gst.Buffer.new_wrapped(payload)
        buf.pts = self.count * Gst.SECOND // 30
        self.count += 1
        self.src.emit("push-buffer", buf)
        sample = self.sink.emit("try-pull-sample", int(timeout_s * Gst.SECOND))
        if sample is None:
            self.errors += 1
            return None
        s = sample.get_caps().get_structure(0)
        width, height = s.get_value("width"), s.get_value("height")
        out = sample.get_buffer()
        data = out.extract_dup(0, out.get_size())
        stride = len(data) // height
        rows = np.frombuffer(data, np.uint8).reshape(height, stride)
        return rows[:, : width * 4].reshape(height, width, 4)

    def close(self) -> None:
        self.pipeline.set_state(Gst.State.NULL)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR over B, G, R in dB (inf for identical pictures)."""
    diff = a[..., :3].astype(np.float64) - b[..., :3].astype(np.float64)
    mse = float(np.mean(diff * diff))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
