"""Which encoders work here: each one proven by a short test encode in a child process.

A broken driver can abort or hang the process that loads it, so the test encodes run in a
child (`python -m spicestream.video.probe`), which reports one JSON line per element. If the
child dies, the element it was testing is rejected with the signal or exit status, and a new
child carries on with the rest. The result is computed once per process and cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from .codec import Codec
from .elements import ELEMENTS, ElementSpec

PROBE_TIMEOUT_S = 20.0
PROBE_SIZE = (256, 144)  # small, but above the minimum size of hardware encoders
PROBE_FRAMES = 3


@dataclass(frozen=True)
class ProbeResult:
    backend: str
    codec: Codec
    element: str
    hardware: bool
    usable: bool
    reason: str


_cache: list[ProbeResult] | None = None
_cache_lock = threading.Lock()


def probe_all(specs: list[ElementSpec] | None = None, timeout: float = PROBE_TIMEOUT_S) -> list[ProbeResult]:
    """Probe `specs` (default: every known element); results in the same order."""
    from . import gst_encoder, mjpeg

    specs = list(ELEMENTS if specs is None else specs)
    results: dict[str, ProbeResult] = {}
    ok, why = gst_encoder.available()
    if not ok:
        for s in specs:
            results[s.element] = ProbeResult("gstreamer", s.codec, s.element, s.hardware, False, why)
    else:
        todo = []
        for s in specs:
            if not gst_encoder.element_exists(s.element):
                reason = ("element not registered (plugin missing, or no device for it)"
                          if s.hardware else "element not installed")
                results[s.element] = ProbeResult("gstreamer", s.codec, s.element, s.hardware, False, reason)
            else:
                todo.append(s)
        while todo:
            todo = _run_child(todo, results, timeout)
    out = [results[s.element] for s in specs]
    ok, why = mjpeg.available()
    out.append(ProbeResult("spice", Codec.MJPEG, "simplejpeg", False, ok, "built in" if ok else why))
    return out


def _run_child(todo: list[ElementSpec], results: dict, timeout: float) -> list[ElementSpec]:
    """Probe in one child; return what is left to probe if the child died part-way."""
    request = json.dumps([dataclasses.asdict(s) for s in todo])
    proc = subprocess.Popen([sys.executable, "-m", "spicestream.video.probe"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "GST_DEBUG": "0"})
    try:
        out, _ = proc.communicate(request, timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        status = None
    started = None
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "start" in record:
            started = record["start"]
        elif "element" in record:
            started = None
            spec = next(s for s in todo if s.element == record["element"])
            results[spec.element] = ProbeResult("gstreamer", spec.codec, spec.element, spec.hardware,
                                                record["usable"], record["reason"])
    left = [s for s in todo if s.element not in results]
    if not left:
        return []
    culprit = next((s for s in left if s.element == started), left[0])
    if status is None:
        reason = f"test encode hung (killed after {timeout:.0f} s)"
    elif status < 0:
        reason = f"test encode crashed the process ({signal.Signals(-status).name})"
    else:
        reason = f"test process exited with status {status}"
    results[culprit.element] = ProbeResult("gstreamer", culprit.codec, culprit.element,
                                           culprit.hardware, False, reason)
    return [s for s in left if s is not culprit]


def cached_probe() -> list[ProbeResult]:
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = probe_all()
        return _cache


def _child() -> None:
    """Child side: test-encode each element given on stdin, one JSON line per element."""
    import numpy as np

    from .encoder import encode_sync
    from .gst_encoder import GstEncoder

    specs = [ElementSpec(**{**d, "codec": Codec(d["codec"])}) for d in json.loads(sys.stdin.read())]
    w, h = PROBE_SIZE
    frame = np.zeros((h, w, 4), np.uint8)
    frame[:, :, 1] = np.arange(w, dtype=np.uint8)[None, :]
    for spec in specs:
        print(json.dumps({"start": spec.element}), flush=True)
        usable, reason = False, ""
        encoder = None
        try:
            encoder = GstEncoder(spec, w, h, 2_000_000, lambda f: None, lambda m: None)
            sizes = [len(encode_sync(encoder, frame, i + 1, timeout=5).data) for i in range(PROBE_FRAMES)]
            usable, reason = all(sizes), "test encode ok" if all(sizes) else "empty output"
        except Exception as exc:
            reason = f"test encode failed: {exc}"
        finally:
            if encoder is not None:
                encoder.close()
        print(json.dumps({"element": spec.element, "usable": usable, "reason": reason}), flush=True)


if __name__ == "__main__":
    _child()
