"""Build and close x265 encoders through spicestream's factory; print the glibc heap in use
(mallinfo2, after malloc_trim) per rebuild as JSON. Run as a child process by
test_codecs.py: the heap of a process of its own, with nothing else allocating."""

import ctypes
import json
import sys

import numpy as np

from spicestream.video.codec import Codec
from spicestream.video.codec_list import CodecEntry
from spicestream.video.encoder import encode_sync
from spicestream.video.factory import VideoCodecs
from spicestream.video.probe import ProbeResult


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2


def heap_in_use() -> int:
    libc.malloc_trim(0)
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def main(rebuilds: int, warmup: int = 20) -> None:
    entry = CodecEntry("gstreamer", Codec.H265)
    codecs = VideoCodecs([entry], probe=[ProbeResult("gstreamer", Codec.H265, "x265enc", False, True, "")])
    width, height = 256, 192
    frame = np.zeros((height, width, 4), np.uint8)
    start = None
    for i in range(warmup + rebuilds):
        if i == warmup:
            start = heap_in_use()
        encoder = codecs.create(entry, width, height, 2_000_000, lambda f: None, print, 30, "BGRx")
        for k in range(3):
            frame[..., 1] = (k * 7 + i) % 256
            encode_sync(encoder, frame, k + 1, timeout=10)
        encoder.close()
        del encoder
    print(json.dumps({"rebuilds": rebuilds, "heap_growth_bytes": heap_in_use() - start}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
