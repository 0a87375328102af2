"""A hint, said once, when the X server we export takes fresh pages for its clients' large
requests, and how to stop it.

An X server reads a large request (a PutImage of a window) into a buffer it reallocs up to
the request's size and back; started the default way, glibc maps fresh pages for every such
request, and zeroing them costs the X server about as much as the drawing (see
`session.X_SERVER_MALLOC_TUNABLES`, which `spicestream run` gives the X servers it starts).
A desktop exported with `serve --source x11` is started by someone else: from its page faults
per frame we captured, we can tell them. The X server's pid comes from SO_PEERCRED on our
connection's socket (a local display only); its faults from /proc/PID/stat.
"""

from __future__ import annotations

import logging
import os
import socket
import struct

log = logging.getLogger("spicestream.x11")

CHECK_EVERY_S = 5.0
MIN_FRAMES = 30  # frames captured in a window before it is judged
# A 640x360 PutImage is 225 pages; an X server whose heap keeps its request buffer takes none.
FAULTS_PER_FRAME = 64.0


def x_server_pid(fd: int) -> int | None:
    """The pid of the peer of the X connection on `fd`, if it is a local (unix) socket."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        return pid if pid > 0 else None  # 0: the server is in another pid namespace
    except OSError:
        return None
    finally:
        sock.close()


def minor_faults(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10, minflt
    except (OSError, ValueError, IndexError):
        return None


class FaultRate:
    """Pure: page faults per captured frame over windows of `every` seconds, fed with totals."""

    def __init__(self, now: float, every: float = CHECK_EVERY_S):
        self.every = every
        self.last: float | None = None  # the last window's faults per frame
        self._at, self._faults, self._frames = now, None, 0

    def due(self, now: float) -> bool:
        return now - self._at >= self.every

    def sample(self, now: float, faults: int, frames: int) -> float | None:
        """Faults per frame since the last sample that judged a window; None until a window
        holds MIN_FRAMES frames (an idle desktop is not judged)."""
        if self._faults is None or faults < self._faults or frames < self._frames:
            self._at, self._faults, self._frames = now, faults, frames  # a first or new baseline
            return None
        if frames - self._frames < MIN_FRAMES:
            self._at = now
            return None
        self.last = (faults - self._faults) / (frames - self._frames)
        self._at, self._faults, self._frames = now, faults, frames
        return self.last


class FreshPagesHint:
    """Watches the exported X server from the capture loop; logs the hint at most once."""

    def __init__(self, display_name: str, fd: int, now: float, every: float = CHECK_EVERY_S):
        self.display_name = display_name
        self.pid = x_server_pid(fd)
        self.rate = FaultRate(now, every)
        self.said = self.pid is None  # nothing to watch: nothing to say

    def check(self, now: float, frames: int) -> None:
        if self.said or not self.rate.due(now):
            return
        faults = minor_faults(self.pid)
        if faults is None:
            self.said = True  # the X server is gone or hidden from us
            return
        rate = self.rate.sample(now, faults, frames)
        if rate is not None and rate >= FAULTS_PER_FRAME:
            self.said = True
            log.warning(
                "the X server of %s (pid %d) takes %.0f page faults a frame: it gets fresh memory "
                "for each large request, which costs it about as much CPU as the drawing. Start it "
                "with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:"
                "glibc.malloc.trim_threshold=33554432 (as `spicestream run` does)",
                self.display_name, self.pid, rate)
