"""How spice-gtk's audio pipeline holds sound, on a replica of it: the pipeline spice-gtk
builds for playback (spice-gstaudio.c: `appsrc is-live=1 do-timestamp=0 format=time ! queue !
audioconvert ! audioresample ! autoaudiosink`, untimestamped buffers) playing into a private
PulseAudio's null sink, fed 10 ms pieces paced by deadline with a click every second; the
sink's monitor is recorded and each click dated (written -> heard). Prints JSON.

    .venv/bin/python bench/client_audio_queue.py

Cases: `steady` (the queue it starts with and keeps), `left_out_N` (N pieces not pushed 3 s
in: the queue after), `pause_1s` (a second of nothing, then sound again). Why the server
drains a spice-gtk client's queue (spicestream/audio/output.py, BufferDrain).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from avsync import EarWatch  # noqa: E402  (dates each click in the monitor's recording)

RATE, PIECE = 48000, 480
CAPS = 'audio/x-raw,format="S16LE",channels=2,rate=48000,layout=interleaved'
PIPELINE = (f'appsrc is-live=1 do-timestamp=0 format=time caps="{CAPS}" name=appsrc ! queue ! '
            "audioconvert ! audioresample ! autoaudiosink")
START_S = 2.0  # the pipeline plays before the first piece (the server's settling)


def case(Gst, pa, pieces: int, left_out: range) -> dict:
    pipe = Gst.parse_launch(PIPELINE)
    src = pipe.get_by_name("appsrc")
    pipe.set_state(Gst.State.PLAYING)
    ear = EarWatch(pa)
    ear.start()
    click = (np.sin(2 * np.pi * 2000 * np.arange(PIECE) / RATE) * 0.8 * 32767).astype(np.int16)
    click, silence = np.repeat(click[:, None], 2, 1).tobytes(), bytes(PIECE * 4)
    time.sleep(START_S)
    events: list[tuple[int, float]] = []
    start = time.monotonic()
    for n in range(pieces):
        if n not in left_out:
            if n % 100 == 50:
                events.append((n, time.monotonic()))
            src.push_buffer(Gst.Buffer.new_wrapped(click if n % 100 == 50 else silence))
        time.sleep(max(0.0, start + (n + 1) * PIECE / RATE - time.monotonic()))
    time.sleep(0.6)
    query = Gst.Query.new_latency()
    reported = query.parse_latency()[1] / 1e6 if pipe.query(query) else None
    pipe.set_state(Gst.State.NULL)
    ear.close()
    ear.join(5)
    heard = []
    for n, t in events:
        after = [o - t for o in ear.onsets if 0 <= o - t < 1.0]
        heard.append({"piece": n, "latency_ms": round(min(after) * 1000, 1) if after else None})
    return {"reported_latency_ms": reported, "clicks": heard}


def main() -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstApp", "1.0")
    from gi.repository import Gst, GstApp  # noqa: F401  (GstApp: appsrc's push_buffer)

    import pulse

    Gst.init(None)
    out = {"bench": "client_audio_queue", "pipeline": PIPELINE, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp, pulse.PulseServer(Path(tmp) / "pulse") as pa:
        os.environ.update(pa.env)
        for name, left_out in (("steady", range(0)), ("left_out_10", range(300, 310)),
                               ("left_out_20", range(300, 320)), ("pause_1s", range(300, 400))):
            out["cases"][name] = case(Gst, pa, 900, left_out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
