"""Drive a real SPICE client (remote-viewer) under Xvfb, for end-to-end tests.

    with XSession() as x:
        viewer = x.start_viewer(f"spice://127.0.0.1:{port}")
        wid = x.find_window(viewer)
        shot = x.screenshot()            # (H, W, 3) uint8 RGB, the whole X screen
        x.focus(wid); x.key("a")
        x.click(300, 200)

Everything started here (Xvfb, viewers) is stopped by `close()` / leaving the `with` block,
also when the test fails. Every wait is a bounded poll. Nothing here knows about spicestream.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np

T = TypeVar("T")

REQUIRED_TOOLS = ("Xvfb", "remote-viewer", "xdotool", "import")
DISPLAY_RANGE = range(90, 121)


def missing_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1,
               what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the test process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped. Only this process."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


class XSession:
    """An Xvfb server on a free display, plus the clients started on it."""

    def __init__(self, width: int = 1024, height: int = 768, log_dir: str | os.PathLike | None = None,
                 start_timeout: float = 15.0):
        self.width, self.height = width, height
        self.start_timeout = start_timeout
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.display: str | None = None
        self.env: dict[str, str] = {}
        self.xvfb: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []

    # -- lifetime -----------------------------------------------------------------------------
    def start(self) -> "XSession":
        if self.xvfb is not None:
            return self
        try:
            self._start_xvfb()
        except BaseException:
            self.close()
            raise
        return self

    def _start_xvfb(self) -> None:
        errors = []
        for number in DISPLAY_RANGE:
            # Skip displays that look taken; Xvfb itself refuses a locked one, which we also handle.
            if os.path.exists(f"/tmp/.X{number}-lock") or os.path.exists(f"/tmp/.X11-unix/X{number}"):
                continue
            read_fd, write_fd = os.pipe()
            try:
                proc = subprocess.Popen(
                    self._server_command(number, write_fd),
                    pass_fds=(write_fd,), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                    stdout=subprocess.DEVNULL, stderr=self._log(self.server_name))
            finally:
                os.close(write_fd)
            try:
                data = self._read_display_number(read_fd)
            finally:
                os.close(read_fd)
            if data.strip() and proc.poll() is None:
                self.xvfb = proc
                self.display = f":{data.decode().strip()}"
                self.env = dict(os.environ, DISPLAY=self.display)
                self.env.pop("WAYLAND_DISPLAY", None)
                return
            _stop(proc)
            errors.append(f":{number} (rc={proc.returncode})")
        raise RuntimeError("could not start Xvfb on any display: " + ", ".join(errors or ["all taken"]))

    server_name = "xvfb"

    def _server_command(self, number: int, displayfd: int) -> list[str]:
        return ["Xvfb", f":{number}", "-displayfd", str(displayfd), "-screen", "0",
                f"{self.width}x{self.height}x24", "-nolisten", "tcp", "-noreset"]

    def _read_display_number(self, fd: int) -> bytes:
        """Xvfb writes "N", then a newline, to -displayfd once it accepts connections, and dies if the
        pipe is closed before the second write: read up to the newline. EOF means it exited
        (most likely the display was taken between our check and its start)."""
        data = b""
        deadline = time.monotonic() + self.start_timeout
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return b""
            chunk = os.read(fd, 64)
            if not chunk:
                break
            data += chunk
        return data if data.endswith(b"\n") else b""

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()
        if getattr(self, "_grab_conn", None) is not None:
            self._grab_conn.disconnect()
            self._grab_conn = None
        if self.xvfb is not None:
            _stop(self.xvfb)  # SIGTERM lets Xvfb remove its lock file and socket
            self.xvfb = None
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> "XSession":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _log(self, name: str):
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(f)
        return f

    # -- clients ------------------------------------------------------------------------------
    def spawn(self, args: list[str], name: str | None = None) -> subprocess.Popen:
        """Start a long-running X client on this display; stopped by `close()`."""
        proc = subprocess.Popen(args, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=self._log(name or Path(args[0]).name),
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.procs.append(proc)
        return proc

    def start_viewer(self, target: str | os.PathLike, *args: str) -> subprocess.Popen:
        """remote-viewer on a URI (spice://host:port) or a .vv connection file."""
        return self.spawn(["remote-viewer", *args, str(target)], name="remote-viewer")

    def stop(self, proc: subprocess.Popen) -> None:
        _stop(proc)
        if proc in self.procs:
            self.procs.remove(proc)

    def run(self, *args: str, timeout: float = 10.0, check: bool = True) -> str:
        """Run a short X command (xdotool, import...) on this display; return its stdout."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed (rc={result.returncode}): "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    # -- windows ------------------------------------------------------------------------------
    def windows(self, pid: int | None = None, class_name: str = "remote-viewer") -> list[int]:
        """Visible top-level windows of a class (and, given `pid`, of that process)."""
        args = ["xdotool", "search", "--onlyvisible", "--class", class_name]
        if pid is not None:
            args[2:2] = ["--pid", str(pid)]
        out = self.run(*args, check=False, timeout=5)
        return [int(w) for w in out.split()]

    def find_window(self, viewer: subprocess.Popen | None = None, timeout: float = 15.0,
                    class_name: str = "remote-viewer") -> int:
        """Wait for a visible window of the viewer; the largest one if there are several."""
        def look():
            if viewer is not None and viewer.poll() is not None:
                raise RuntimeError(f"viewer exited with rc={viewer.returncode}")
            found = self.windows(viewer.pid if viewer is not None else None, class_name)
            return max(found, key=lambda w: self.geometry(w)[2] * self.geometry(w)[3]) if found else None
        return wait_until(look, timeout, 0.1, "the remote-viewer window")

    def geometry(self, window: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of a window on the screen."""
        values = {}
        for line in self.run("xdotool", "getwindowgeometry", "--shell", str(window), timeout=5).split():
            key, _, value = line.partition("=")
            values[key] = value
        return int(values["X"]), int(values["Y"]), int(values["WIDTH"]), int(values["HEIGHT"])

    def focused_window(self) -> int | None:
        out = self.run("xdotool", "getwindowfocus", "-f", check=False, timeout=5).strip()
        return int(out) if out.isdigit() else None

    def focus(self, window: int, timeout: float = 5.0) -> None:
        """Give `window` the keyboard focus. There is no window manager on this display, so
        `windowactivate` (_NET_ACTIVE_WINDOW) cannot work: set the X input focus directly and
        check it took."""
        def attempt():
            self.run("xdotool", "windowraise", str(window), check=False, timeout=5)
            self.run("xdotool", "windowfocus", str(window), check=False, timeout=5)
            return self.focused_window() == window
        wait_until(attempt, timeout, 0.2, f"focus on window {window}")

    # -- input (XTEST: real device events, which GTK accepts; unlike `--window`/XSendEvent) ----
    def key(self, *keys: str, delay_ms: int = 12) -> None:
        self.run("xdotool", "key", "--delay", str(delay_ms), *keys)

    def type(self, text: str, delay_ms: int = 12) -> None:
        self.run("xdotool", "type", "--delay", str(delay_ms), text)

    def move(self, x: int, y: int) -> None:
        self.run("xdotool", "mousemove", "--sync", str(int(x)), str(int(y)))

    def click(self, x: int, y: int, button: int = 1) -> None:
        self.move(x, y)
        self.run("xdotool", "click", str(button))

    # -- pictures -----------------------------------------------------------------------------
    def screenshot(self) -> np.ndarray:
        """The whole screen as an (H, W, 3) uint8 RGB array."""
        expected = self.width * self.height * 3
        result = subprocess.run(["import", "-silent", "-window", "root", "-depth", "8", "rgb:-"],
                                env=self.env, capture_output=True, timeout=10)
        if result.returncode != 0 or len(result.stdout) != expected:
            raise RuntimeError(f"screenshot failed (rc={result.returncode}, {len(result.stdout)} bytes "
                               f"of {expected}): {result.stderr.decode(errors='replace').strip()}")
        return np.frombuffer(result.stdout, np.uint8).reshape(self.height, self.width, 3)

    def grab(self) -> np.ndarray:
        """The whole screen like `screenshot`, read with one GetImage (milliseconds, where
        `import` takes a process start): for timing when a picture first appears."""
        import xcffib
        import xcffib.xproto as xp

        if getattr(self, "_grab_conn", None) is None:
            self._grab_conn = xcffib.connect(display=self.display)
        conn = self._grab_conn
        root = conn.get_setup().roots[0].root
        reply = conn.core.GetImage(xp.ImageFormat.ZPixmap, root, 0, 0, self.width, self.height,
                                   0xFFFFFFFF).reply()
        bgrx = np.frombuffer(reply.data.buf(), np.uint8).reshape(self.height, self.width, 4)
        return np.ascontiguousarray(bgrx[..., 2::-1])

    def screen_size(self) -> tuple[int, int]:
        """The X screen's size now (xdpyinfo)."""
        for line in self.run("xdpyinfo", timeout=10).splitlines():
            if "dimensions:" in line:
                w, h = line.split()[1].split("x")
                return int(w), int(h)
        raise RuntimeError("xdpyinfo printed no dimensions")

    @staticmethod
    def save(shot: np.ndarray, path: str | os.PathLike) -> None:
        from PIL import Image
        Image.fromarray(np.ascontiguousarray(shot), "RGB").save(path)


class XorgDummySession(XSession):
    """Xorg with the dummy video driver (xserver-xorg-video-dummy), configured as `spicestream
    run --x-server xorg` configures it: unlike Xvfb, its screen takes any size through RandR,
    as a desktop that follows the viewer's window needs."""

    server_name = "xorg"

    def __init__(self, width: int, height: int, log_dir: str | os.PathLike, **kw):
        super().__init__(width, height, log_dir, **kw)
        self.config = Path(log_dir) / "xorg-dummy.conf"

    def _server_command(self, number: int, displayfd: int) -> list[str]:
        from spicestream.session import XORG_DUMMY_CONF

        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(XORG_DUMMY_CONF)
        return ["Xorg", f":{number}", "-displayfd", str(displayfd), "-config", str(self.config),
                "-logfile", str(self.config.with_suffix(".log")), "-nolisten", "tcp", "-noreset",
                "-novtswitch", "-sharevts"]

    def _start_xvfb(self) -> None:
        super()._start_xvfb()
        from spicestream.sources.x11randr import X11Resizer

        # The dummy starts at its largest mode. Kept open: a mode goes with its X connection.
        self._resizer = X11Resizer(self.display)
        if not self._resizer.resize(self.width, self.height):
            raise RuntimeError(f"Xorg-dummy did not take {self.width}x{self.height}")

    def close(self) -> None:
        resizer, self._resizer = getattr(self, "_resizer", None), None
        if resizer is not None:
            try:
                resizer.close()
            except Exception:
                pass
        super().close()
