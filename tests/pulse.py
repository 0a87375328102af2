"""A private PulseAudio server with a null sink, for recording what a client plays (and a
source for what a client records): `with PulseServer(dir) as pulse: env.update(pulse.env)`."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np


def available() -> bool:
    return all(shutil.which(t) for t in ("pulseaudio", "pactl", "parec"))


class PulseServer:
    """spicestream's own private PulseAudio (spicestream.session.PrivatePulse), for tests."""

    def __init__(self, directory: str | os.PathLike, sink: str = "spice"):
        from spicestream.session import PrivatePulse

        self.server = PrivatePulse(Path(directory), sink)
        self.sink = sink
        self.env = {"PULSE_SERVER": self.server.address, "PULSE_SINK": sink}

    def start(self) -> "PulseServer":
        self.server.start()
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=self.client_env(), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("pulseaudio did not answer within 15 s")
            time.sleep(0.1)
        return self

    def client_env(self, base: dict | None = None) -> dict:
        return dict(base if base is not None else os.environ, **self.env)

    def record(self, path: str | os.PathLike) -> subprocess.Popen:
        """Record the null sink's monitor (what clients play) as raw s16le 48 kHz stereo."""
        return subprocess.Popen(["parec", "-d", f"{self.sink}.monitor", "--format=s16le", "--rate=48000",
                                 "--channels=2", "--raw", "--latency-msec=5"],
                                stdout=open(path, "wb"), env=self.client_env())

    def close(self) -> None:
        self.server.stop()

    def __enter__(self) -> "PulseServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def read_recording(path: str | os.PathLike) -> np.ndarray:
    """A parec recording as float (n, 2) in [-1, 1]."""
    data = np.fromfile(path, "<i2")
    return data[: len(data) // 2 * 2].reshape(-1, 2).astype(np.float64) / 32768.0
