"""Watch a server's stream without decoding it and print one JSON line per frame.

    python -m spicestream.testing.watch --host 192.0.2.1 --port 5900 --seconds 30

Used by tests that put the client in another network namespace (where it must be its own
process). Each line: {"stamp", "arrival" (time.monotonic(), which all namespaces share),
"size", "margin_ms", "key"}; a last line {"summary": ...}. Sends STREAM_REPORTs like spice-gtk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..protocol.constants import DisplayCap
from .client import TestClient

CAPS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
        DisplayCap.LZ4_COMPRESSION, DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG,
        DisplayCap.CODEC_VP8, DisplayCap.CODEC_H264)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--password")
    args = parser.parse_args(argv)
    client = TestClient(args.host, args.port, password=args.password, display_caps=CAPS,
                        decode_streams=False, log_limit=1_000_000)
    client.connect(timeout=30)
    print(json.dumps({"connected": time.monotonic()}), flush=True)
    end = time.monotonic() + args.seconds
    printed = 0
    while time.monotonic() < end:
        time.sleep(0.2)
        log = client.stream_log
        for entry in log[printed:]:
            print(json.dumps({"stamp": entry["mm_time"], "arrival": entry["arrival"],
                              "size": entry["size"], "margin_ms": entry["margin_ms"]}))
        printed = len(log)
        sys.stdout.flush()
    print(json.dumps({"summary": {"frames": len(client.stream_log), "reports": client.reports_sent}}),
          flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
