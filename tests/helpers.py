"""Small helpers shared by the tests."""

import time

import numpy as np

# An X server started the default way takes fresh pages for each large request only while
# glibc's dynamic mmap threshold has not risen; the first free() of a large mmapped block
# raises it, and some runs (seen under load) get there early and never churn. Fixed at glibc's
# starting value, the threshold does not move: an X server started with this churns every time.
X_SERVER_CHURNING_TUNABLES = "glibc.malloc.mmap_threshold=131072"


def random_frame(height, width, seed=0):
    frame = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    frame[..., 3] = 255
    return frame


def same_picture(a, b):
    """Equal in B, G, R (the x byte is not part of the picture)."""
    return a is not None and b is not None and a.shape == b.shape and (a[..., :3] == b[..., :3]).all()


_networks = iter(range(1 << 30))


def fresh_source() -> str:
    """A loopback address in a /24 no other test peer used (127.10.0.1, 127.10.1.1, ...).

    Tests that open many links, or send wrong tickets on purpose, come each from a network of
    their own: the server limits link hellos per network and holds back answers to a network
    that keeps failing (the guessing brake), which is not what those tests are about."""
    n = next(_networks)
    return f"127.{10 + (n // 250) % 240}.{n % 250}.1"


class Background:
    """Runs `self.run()` on a daemon thread between `with` and its end; `run` loops until
    `self.stop` is set. Subclasses call `super().__init__()` and define `run`."""

    def __init__(self):
        import threading

        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


class Paced(Background):
    """Calls `self.draw(k)` for k = 0, 1, 2... at `fps`, paced by deadline (a slow frame
    does not push every later one back); `self.k` counts the frames actually drawn, which is
    what tests judge against, never the nominal rate. If the thread falls more than a frame
    behind it skips ahead rather than bursting."""

    def __init__(self, fps: float = 30):
        self.fps, self.k = fps, 0
        super().__init__()

    def draw(self, k: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        period, next_at = 1 / self.fps, time.monotonic()
        while not self.stop.is_set():
            self.draw(self.k)
            self.k += 1
            next_at += period
            now = time.monotonic()
            if next_at < now - period:
                next_at = now
            self.stop.wait(max(0.0, next_at - now))


class FakeConnection:
    """The part of a server connection an `Agent` uses, for driving one without a socket:
    counts what it sends; an abort is a test failure (only hostile streams close, and those
    raise ProtocolError first)."""

    can_send = True
    closed = False

    def __init__(self, peer: str = "fake"):
        self.peer = peer
        self.sent = 0

    def abort(self, reason, level=None) -> None:
        raise AssertionError(f"aborted: {reason}")

    def send(self, message) -> None:
        self.sent += 1

    def flush(self) -> None:
        pass


def metrics_text(server) -> str:
    """What /metrics would serve for `server` now (the collector, without the HTTP server)."""
    import pytest

    prometheus_client = pytest.importorskip("prometheus_client")
    from spicestream.server.metrics import StatsCollector

    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(server))
    return prometheus_client.generate_latest(registry).decode()


class X11Export:
    """spicestream's X11 source exporting a running X server (`x`, started) to `server`, as
    `spicestream serve --source x11` runs it: run() waits in a thread of its own for `stop`
    while the capture runs on the server's loop."""

    def __init__(self, x, server, view_only: bool = False, fps: float = 30):
        import threading

        from spicestream.sources.x11 import X11Source

        self.source = X11Source(x.display, server, view_only=view_only, fps=fps)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.source.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.source.close()


class WindowImages:
    """An X client with an override-redirect window of width x height at the top-left of
    `display`, drawn whole by one PutImage a call (BIG-REQUESTS). The request is built directly:
    xcffib's own packing of a 1 MB image takes ~15 ms."""

    def __init__(self, display: str, width: int, height: int):
        import struct

        import xcffib
        import xcffib.xproto as xp

        self.conn = xcffib.connect(display=display)
        self.screen = screen = self.conn.get_setup().roots[0]
        self.window = window = self.conn.generate_id()
        gc = self.conn.generate_id()
        self.conn.core.CreateWindow(screen.root_depth, window, screen.root, 0, 0, width, height, 0,
                                    xp.WindowClass.InputOutput, screen.root_visual, xp.CW.OverrideRedirect, [1])
        self.conn.core.MapWindow(window)
        self.conn.core.CreateGC(gc, window, 0, [])
        self.header = struct.pack("=xB2xIIHHhhBB2x", xp.ImageFormat.ZPixmap, window, gc, width, height,
                                  0, 0, 0, screen.root_depth)

    def put(self, pixels) -> None:
        """Draw `pixels` (height x width BGRx: the ZPixmap of a 24-bit TrueColor visual)."""
        import io

        buf = io.BytesIO()
        buf.write(self.header)
        buf.write(pixels)
        self.conn.core.send_request(72, buf)  # PutImage; libxcb sets the length

    def round_trip(self) -> None:
        """Returns once the X server has read (and drawn) everything sent before."""
        self.conn.core.GetInputFocus().reply()

    def close(self) -> None:
        self.conn.disconnect()
