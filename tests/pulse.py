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
    def __init__(self, directory: str | os.PathLike, sink: str = "spice"):
        self.dir = Path(directory)
        self.sink = sink
        self.socket = self.dir / "native"
        self.env = {"PULSE_SERVER": f"unix:{self.socket}", "PULSE_SINK": sink}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PulseServer":
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HOME=str(self.dir / "home"), XDG_RUNTIME_DIR=str(self.dir),
                   PULSE_RUNTIME_PATH=str(self.dir))
        env.pop("PULSE_SERVER", None)
        self.proc = subprocess.Popen(
            ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
             "--use-pid-file=no", "--disable-shm=yes",
             f"--load=module-native-protocol-unix socket={self.socket} auth-anonymous=1",
             f"--load=module-null-sink sink_name={self.sink} rate=48000 channels=2"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "pulseaudio.log", "ab"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited ({self.proc.returncode}); see {self.dir}/pulseaudio.log")
            if subprocess.run(["pactl", "info"], env=self.client_env(), capture_output=True).returncode == 0:
                return self
            time.sleep(0.1)
        self.close()
        raise RuntimeError("pulseaudio did not answer within 15 s")

    def client_env(self, base: dict | None = None) -> dict:
        return dict(base if base is not None else os.environ, **self.env)

    def record(self, path: str | os.PathLike) -> subprocess.Popen:
        """Record the null sink's monitor (what clients play) as raw s16le 48 kHz stereo."""
        return subprocess.Popen(["parec", "-d", f"{self.sink}.monitor", "--format=s16le", "--rate=48000",
                                 "--channels=2", "--raw", "--latency-msec=5"],
                                stdout=open(path, "wb"), env=self.client_env())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> "PulseServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def read_recording(path: str | os.PathLike) -> np.ndarray:
    """A parec recording as float (n, 2) in [-1, 1]."""
    data = np.fromfile(path, "<i2")
    return data[: len(data) // 2 * 2].reshape(-1, 2).astype(np.float64) / 32768.0
