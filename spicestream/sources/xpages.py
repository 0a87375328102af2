"""X servers and fresh pages: the malloc thresholds that `spicestream run` gives the X servers
it starts, and a hint, said once, when an X server exported with `serve --source x11` (started
by someone else) needs them.

The hint comes from the X server's page faults per frame we captured, over windows of a few
seconds. Its pid comes from SO_PEERCRED on our connection's socket (a local display only); its
faults from /proc/PID/stat.
"""

from __future__ import annotations

import logging
import os
import socket

from ..unixpeer import peer_pid

log = logging.getLogger("spicestream.x11")

# An X server reads a large request (a PutImage of a whole window: 0.9 MB at 640x360) into an
# input buffer that it reallocs up to the request's size and back down after it (os/io.c,
# ReadRequestFromClient). glibc serves a block that large with mmap, and since realloc, unlike
# free, never raises malloc's dynamic mmap threshold, every such request lands in fresh pages
# that the kernel faults in and zeroes again: perf on Xvfb under a 30 fps PutImage client puts
# half its CPU in recvmsg's page faults. Fixed thresholds above the largest request
# (BIG-REQUESTS: 16 MiB) keep the buffer in the heap: Xvfb 1.18 -> 0.59 ms a frame there.
X_SERVER_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=33554432"

CHECK_EVERY_S = 5.0
MIN_FRAMES = 30  # frames captured in a window before it is judged
# A 640x360 PutImage is 225 pages; an X server whose heap keeps its request buffer takes none.
FAULTS_PER_FRAME = 64.0
# Windows in a row over FAULTS_PER_FRAME before the hint: pages touched once (new capture
# segments after a resize, a framebuffer's first draw) can fill one window, not two.
HIGH_WINDOWS = 2


def x_server_pid(fd: int) -> int | None:
    """The pid of the peer of the X connection on `fd`, if it is a local (unix) socket."""
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    try:
        pid = peer_pid(sock) if sock.family == socket.AF_UNIX else None
    finally:
        sock.close()
    return pid or None  # 0: the server is in another pid namespace


def minor_faults(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10, minflt
    except (OSError, ValueError, IndexError):
        return None


class FaultRate:
    """Pure: page faults per captured frame over windows of `every` seconds, fed with totals."""

    def __init__(self, now: float, every: float = CHECK_EVERY_S, min_frames: int = MIN_FRAMES):
        self.every, self.min_frames = every, min_frames
        self.last: float | None = None  # the last window's faults per frame
        self._at, self._faults, self._frames = now, None, 0

    def due(self, now: float) -> bool:
        return now - self._at >= self.every

    def sample(self, now: float, faults: int, frames: int) -> float | None:
        """Faults per frame over the window that ends now; None for a window of fewer than
        `min_frames` frames (an idle desktop is not judged, nor are its faults carried over)."""
        judged = (self._faults is not None and faults >= self._faults
                  and frames - self._frames >= self.min_frames)
        if judged:
            self.last = (faults - self._faults) / (frames - self._frames)
        self._at, self._faults, self._frames = now, faults, frames
        return self.last if judged else None


class FreshPagesHint:
    """Watches the exported X server as frames are captured; logs the hint at most once."""

    def __init__(self, display_name: str, fd: int, now: float, every: float = CHECK_EVERY_S):
        self.display_name = display_name
        self.pid = x_server_pid(fd)
        self.rate = FaultRate(now, every)
        self.high = 0  # judged windows in a row over FAULTS_PER_FRAME
        self.said = self.pid is None  # nothing to watch: nothing to say

    def check(self, now: float, frames: int) -> None:
        if self.said or not self.rate.due(now):
            return
        faults = minor_faults(self.pid)
        if faults is None:
            self.said = True  # the X server is gone or hidden from us
            return
        rate = self.rate.sample(now, faults, frames)
        if rate is None:
            return
        self.high = self.high + 1 if rate >= FAULTS_PER_FRAME else 0
        if self.high >= HIGH_WINDOWS:
            self.said = True
            log.warning(
                "the X server of %s (pid %d) takes %.0f page faults a frame: it gets fresh memory "
                "for each large request, which costs it about as much CPU as the drawing. Start it "
                "with GLIBC_TUNABLES=%s (as `spicestream run` does)",
                self.display_name, self.pid, rate, X_SERVER_MALLOC_TUNABLES)
