"""Without GStreamer (no PyGObject at all) the built-in MJPEG encoder still streams."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys
    sys.modules["gi"] = None  # as if PyGObject were not installed: "import gi" fails
    import time
    import numpy as np
    import simplejpeg
    import spicestream
    from spicestream.protocol.constants import DisplayCap
    from spicestream.protocol.messages import SERVER
    from spicestream.testing.client import TestClient
    from spicestream.video.factory import VideoCodecs

    table = {(r["encoder"], r["element"]): r for r in VideoCodecs().table()}
    assert not table[("gstreamer", "x264enc")]["usable"]
    assert "GStreamer" in table[("gstreamer", "x264enc")]["reason"]
    assert table[("spice", "simplejpeg")]["usable"]

    server = spicestream.Server(port=0, width=320, height=240, streaming_video="all").start()
    caps = (DisplayCap.MONITORS_CONFIG, DisplayCap.SIZED_STREAM, DisplayCap.MULTI_CODEC,
            DisplayCap.CODEC_MJPEG, DisplayCap.CODEC_H264)
    with TestClient("127.0.0.1", server.port, display_caps=caps, decode_streams=False) as client:
        client.wait_for(lambda c: c.marked)
        rng = np.random.default_rng(0)
        deadline, next_at = time.monotonic() + 15, time.monotonic()
        while len(client.stream_log) <= 5 and time.monotonic() < deadline:  # paced by deadline
            frame = np.zeros((240, 320, 4), np.uint8)
            frame[64:192, 64:256] = rng.integers(0, 255, (128, 192, 4), dtype=np.uint8)
            server.display.update(frame, damage=[(64, 64, 192, 128)])
            next_at += 1 / 30
            time.sleep(max(0.0, next_at - time.monotonic()))
        create = next(m for m in client.messages if type(m) is SERVER.DISPLAY_STREAM_CREATE)
        assert create.codec_type == 1  # MJPEG, although the client also offers H.264
        data = next(m for m in client.messages if type(m) is SERVER.DISPLAY_STREAM_DATA_SIZED).data
        assert data[:2] == b"\\xff\\xd8" and data[-2:] == b"\\xff\\xd9"  # one whole JPEG
        assert simplejpeg.decode_jpeg(data).shape == (128, 192, 3)
    server.stop()
    print("OK")
''')


def test_builtin_mjpeg_streams_without_gstreamer():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
