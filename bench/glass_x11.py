"""Glass-to-glass latency and server CPU, exporting an X server: spicestream's X11 source vs Xspice; prints JSON.

    .venv/bin/python bench/glass_x11.py [--seconds 20] [--codecs h264,mjpeg] [--screen 640x360]
                                        [--capture damage|spin] [--sides spicestream,xspice]
                                        [--served-x session|plain]

Same content, same codec, two ways of serving an X desktop over SPICE:

  (a) spicestream: an Xvfb (the served desktop), exported by `spicestream serve --source x11
      --x-display :N --video-codecs C --streaming-video all` running as its own process. The
      Xvfb is, by default (`--served-x session`), the one `spicestream run` starts
      (spicestream.session.PrivateXServer: its malloc keeps the heap it has for large requests,
      see X_SERVER_MALLOC_TUNABLES); `--served-x plain` starts Xvfb the default way, as a desktop
      a user already runs may be, where every whole-window PutImage is read into fresh pages;
  (b) Xspice (Debian's xserver-xspice): an Xorg with the spiceqxl driver, i.e. an X server with
      a built-in spice-server, started with a generated xorg.conf (see XSPICE_CONF: the driver
      here reads no defaults for its buffer sizes, so they are spelled out, or it aborts at start)
      and the same XSPICE_* environment the `Xspice` wrapper sets for `--port P
      --disable-ticketing --streaming-video all --video-codecs C`.

Content: an X client of its own (a child process, xcffib) maps a 640x360 override-redirect
window at the top-left of the served screen and draws numbered frames into it at `--fps`,
paced by deadline: bench/glass.py's moving texture, corner markers and frame-number strip(s),
each frame one PutImage (BIG-REQUESTS; the request is built directly, xcffib's own packing of
900 KB takes ~15 ms), then a GetInputFocus round trip. `time.monotonic()` is stamped just
before the PutImage.

remote-viewer runs under its own Xvfb (tests/xclient.XSession, 1920x1080), `--zoom=100`; the
content is located once from the markers of a still first frame, then bench/glass.py's capturer
(a separate process) reads the strip rows off that Xvfb and stamps each new number. Latency of
frame k = first sighting (of all its strips) - its stamp, over the frames stamped from 1 s
into the `--seconds` window to its end; `shown_share`: share of those frames ever seen.

Server CPU: utime+stime (+ cutime+cstime, reaped children) from /proc/PID/stat, over the
`--seconds` window: (a) the spicestream process + the served Xvfb; (b) the Xorg process of
Xspice (its spice-server runs inside it). `cpu_ratio_spicestream_over_xspice` = (a)/(b) per
codec. The client side (remote-viewer, its Xvfb, the capturer, the drawing client) is reported
separately in `client_cpu_s`. `server_threads`: the same window per thread of each server
process (CPU, CPU ms and voluntary context switches per frame drawn): spicestream's own threads
are named ss-server (the asyncio loop), ss-mjpeg (the built-in MJPEG's thread, for frames too
large to encode on the loop; the X11 capture runs on the asyncio loop; older
results have it in its own thread, "(main)"); GStreamer's
carry their element names (src:src: appsrc's thread, converting and, for small frames,
encoding; queueN:src: the encoder behind a queue); Xspice's are Xorg's main thread (drawing),
"SPICE Worker" and GStreamer's. `server_tcp_bytes_per_s`: bytes the server sent on its SPICE
connections over the window (`ss -ti` bytes_sent, all channels), i.e. the bit rate.
`server_minor_faults_per_frame`: page faults per frame drawn, per server process (a PutImage of
the window is 225 pages: an X server that reads it into fresh pages shows ~225 here).

`--count-calls` (spicestream side): the CLI runs under bench/callcount.py, which counts the
Python calls of each of its Python threads over the window; `python_calls_per_frame` and
`python_calls_top` (caller, callee, calls a frame) come out per thread. A steadier figure than
CPU for how much Python a frame runs; the hook slows the server, so that run's CPU and latency
say nothing.

Reading the numbers: Xspice's ~410 ms is almost all by design, not work: spice-server stamps
stream frames with its multimedia clock and gives the client that clock MM_TIME_DELTA = 400 ms
behind (reds.c), and spice-gtk shows each stream frame when its stamp comes due (a playback
delay for audio/video sync). Its bit rate and MJPEG quality also differ from spicestream's, so
the CPU ratio compares two servers' defaults, not equal work per byte.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))  # xclient, helpers

import glass  # noqa: E402  (strip painting/reading, locate, the capturer)
from spicestream.sources.xpages import minor_faults  # noqa: E402

CODECS = {"h264": "gstreamer:h264", "mjpeg": "spice:mjpeg", "vp8": "gstreamer:vp8"}
SIDES = ("spicestream", "xspice")
CONTENT = (640, 360)
VIEWER_SCREEN = (1920, 1080)
CLK_TCK = os.sysconf("SC_CLK_TCK")

XSPICE_CONF = """\
Section "Device"
    Identifier "XSPICE"
    Driver "spiceqxl"
    # This build reads no defaults for these (surface0 comes out 0 bytes and the driver
    # aborts in InitOutput: "malloc(): corrupted top size"), so all are given.
    Option "NumHeads" "1"
    Option "FrameBufferSize" "16"
    Option "SurfaceBufferSize" "128"
    Option "CommandBufferSize" "128"
    # The documented defaults, which this build would otherwise read as False / 0.
    Option "EnableImageCache" "True"
    Option "EnableFallbackCache" "True"
    Option "EnableSurfaces" "True"
    Option "SpiceDeferredFPS" "0"
    Option "SpiceAddr" "127.0.0.1"
EndSection

Section "InputDevice"
    Identifier "XSPICE POINTER"
    Driver     "xspice pointer"
EndSection

Section "InputDevice"
    Identifier "XSPICE KEYBOARD"
    Driver     "xspice keyboard"
EndSection

Section "Monitor"
    Identifier    "Configured Monitor"
    Modeline "{w}x{h}" {clock:.2f} {w} {hs} {he} {ht} {h} {vs} {ve} {vt} -HSync +Vsync
EndSection

Section "Screen"
    Identifier     "XSPICE Screen"
    Monitor        "Configured Monitor"
    Device         "XSPICE"
    DefaultDepth    24
    SubSection "Display"
        Depth 24
        Modes "{w}x{h}"
        Virtual {w} {h}
    EndSubSection
EndSection

Section "ServerLayout"
    Identifier "XSPICE Example"
    Screen "XSPICE Screen"
    InputDevice "XSPICE KEYBOARD"
    InputDevice "XSPICE POINTER"
EndSection

Section "ServerFlags"
    Option "AutoAddDevices" "False"
EndSection
"""


def xspice_conf(width: int, height: int) -> str:
    """The config with a 60 Hz modeline for the screen size (blanking roughly as gtf's)."""
    ht, vt = width + width // 5, height + max(3, height // 30)
    return XSPICE_CONF.format(w=width, h=height, hs=width + 16, he=width + 80, ht=ht,
                              vs=height + 1, ve=height + 3, vt=vt, clock=ht * vt * 60 / 1e6)


# -- /proc accounting ------------------------------------------------------------------------------
def cpu_seconds(pid: int | None, children: bool = True) -> float | None:
    """utime+stime (and cutime+cstime: reaped children) of a process, in seconds."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def thread_cpu(pid: int | None) -> dict[tuple[int, str], tuple[float, int]]:
    """Per thread of a process: (tid, name) -> (utime+stime in s, voluntary context switches).
    The main thread is named "(main)"."""
    out: dict[tuple[int, str], tuple[float, int]] = {}
    if pid is None:
        return out
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))
        except (OSError, StopIteration):  # the thread ended meanwhile
            continue
        name = "(main)" if int(tid) == pid else stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[(int(tid), name)] = ((int(fields[11]) + int(fields[12])) / CLK_TCK, switches)
    return out


def thread_cpu_delta(before: dict, after: dict, frames: int) -> dict:
    """Threads that ran in the window, by name (same-named threads summed): CPU s, and CPU ms
    and voluntary context switches (sleeps: each one a wake-up to pay for) per frame drawn."""
    grouped: dict[str, list[float]] = {}
    for key, (cpu, switches) in after.items():
        cpu0, switches0 = before.get(key, (0.0, 0))
        entry = grouped.setdefault(key[1], [0.0, 0])
        entry[0] += cpu - cpu0
        entry[1] += switches - switches0
    rows = {name: {"cpu_s": round(cpu, 2), "cpu_ms_per_frame": round(cpu * 1000 / max(1, frames), 2),
                   "wakes_per_frame": round(switches / max(1, frames), 1)}
            for name, (cpu, switches) in grouped.items() if cpu >= 0.01 or switches >= frames}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["cpu_s"]))


def tcp_bytes_sent(port: int) -> int | None:
    """Bytes sent so far on the established TCP connections from local port `port` (all of a
    client's SPICE channels), from `ss -ti`."""
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    total = 0
    for word in out.split():
        if word.startswith("bytes_sent:"):
            total += int(word.split(":", 1)[1])
    return total


def machine_busy() -> tuple[int, int]:
    """(busy ticks, all ticks) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def loaded_libraries(pid: int, words=("avdec", "libav", "openh264", "x264", "jpeg", "vpx", "gstvideo")) -> list[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            names = {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(n for n in names if any(w in n for w in words))


# -- processes --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with rc={proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f} s")


def stop(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL; always reaped. Only this process."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


def free_display(numbers=range(60, 90)) -> int:
    for n in numbers:
        if not os.path.exists(f"/tmp/.X{n}-lock") and not os.path.exists(f"/tmp/.X11-unix/X{n}"):
            return n
    raise RuntimeError("no free X display number in 60..89")


def wait_x(display: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    import xcffib
    import xcffib.xproto  # noqa: F401  (xcffib.connect needs the core protocol loaded)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"X server {display} exited with rc={proc.returncode}")
        try:
            xcffib.connect(display=display).disconnect()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise TimeoutError(f"X server {display} not reachable after {timeout:.0f} s")
            time.sleep(0.2)


class Spicestream:
    """(a): an Xvfb of the screen size, exported by the spicestream CLI."""

    name = "spicestream"

    def __init__(self, codec: str, screen: tuple[int, int], log_dir: Path, count_calls: bool = False,
                 served_x: str = "session"):
        self.served_x = served_x
        if served_x == "session":
            from spicestream.session import PrivateXServer
            (log_dir / "served").mkdir(parents=True, exist_ok=True)
            self.x = PrivateXServer("xvfb", screen, log_dir / "served").start()
            self.x_pid, self.close_x = self.x.proc.pid, self.x.stop
        else:
            import xclient
            self.x = xclient.XSession(*screen, log_dir=log_dir / "served").start()
            self.x_pid, self.close_x = self.x.xvfb.pid, self.x.close
        self.display = self.x.display
        self.port = free_port()
        # --count-calls: the same CLI under bench/callcount.py (SIGUSR1/SIGUSR2 bound the window)
        self.calls_path = log_dir / "calls.json" if count_calls else None
        launcher = ([str(ROOT / ".venv/bin/python"), str(ROOT / "bench/callcount.py"), str(self.calls_path), "--"]
                    if count_calls else [str(ROOT / ".venv/bin/spicestream")])
        self.command = [*launcher, "-v", "serve", "--source", "x11",
                        "--x-display", self.display, "--host", "127.0.0.1", "--port", str(self.port),
                        "--disable-ticketing", "--video-codecs", CODECS[codec],
                        "--streaming-video", "all"]
        self.log_path = log_dir / "spicestream.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_port(self.port, self.proc)
        except BaseException:
            self.close()
            raise

    def server_pids(self) -> dict[str, int]:
        return {"spicestream": self.proc.pid, "served_xvfb": self.x_pid}

    def notes(self) -> dict:
        lines = self.log_path.read_text(errors="replace").splitlines()
        streams = [ln for ln in lines if ": stream " in ln or "own encoder" in ln or "no codec" in ln]
        warnings = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln or "Traceback" in ln]
        return {"command": " ".join(self.command), "served_x": self.served_x, "stream_log": streams[:6],
                "warnings": {"count": len(warnings), "first": warnings[:5]}}

    def close(self) -> None:
        stop(self.proc)
        self.log.close()
        self.close_x()


class Xspice:
    """(b): Xorg + spiceqxl_drv (a spice-server inside the X server), as `Xspice` starts it."""

    name = "xspice"

    def __init__(self, codec: str, screen: tuple[int, int], log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        number = free_display()
        self.display = f":{number}"
        self.conf = log_dir / "xspice.xorg.conf"
        self.conf.write_text(xspice_conf(*screen))
        self.env = dict(os.environ, XSPICE_PORT=str(self.port), XSPICE_DISABLE_TICKETING="1",
                        XSPICE_STREAMING_VIDEO="all", XSPICE_VIDEO_CODECS=CODECS[codec],
                        DISPLAY=self.display)
        self.equivalent = (f"Xspice --config {self.conf} --port {self.port} --disable-ticketing "
                           f"--streaming-video all --video-codecs {CODECS[codec]} {self.display}")
        self.command = ["Xorg", "-config", str(self.conf), "-noreset", "-nolisten", "tcp",
                        "-logfile", str(log_dir / "xorg.log"), self.display]
        self.log_path = log_dir / "xorg.stderr"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_x(self.display, self.proc)
            wait_port(self.port, self.proc)
        except BaseException:
            self.close()
            raise

    def server_pids(self) -> dict[str, int]:
        return {"xorg_xspice": self.proc.pid}

    def notes(self) -> dict:
        lines = self.log_path.read_text(errors="replace").splitlines()
        interesting = [ln for ln in lines if any(w in ln.lower() for w in
                                                   ("stream", "codec", "gstreamer", "error", "warn"))]
        return {"command": " ".join(self.command), "equivalent": self.equivalent,
                "env": {k: v for k, v in self.env.items() if k.startswith("XSPICE_")},
                "log": interesting[:8]}

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


# -- the drawing client (a child process: `glass_x11.py --draw-child CONFIG`) ----------------------
def strip_origins(width: int, height: int) -> list[tuple[int, int]]:
    if hasattr(glass, "strip_origins"):
        return list(glass.strip_origins(width, height))
    return [glass.strip_origin(width)]


def draw_child(config: dict) -> None:
    """Map the window, draw the still frame 0, warp the pointer clear of the strips and markers,
    say 'ready'; on 'go' draw frames 0, 1, 2... at fps until 'stop'; print JSON: the stamps."""
    from helpers import Paced, WindowImages

    width, height = config["width"], config["height"]
    images = WindowImages(config["display"], width, height)
    images.conn.core.WarpPointer(0, images.screen.root, 0, 0, 0, 0, width // 2, height // 2)
    bases = glass.base_frames(width, height)
    origins = strip_origins(width, height)

    def frame(k: int) -> np.ndarray:
        f = bases[k % len(bases)].copy()
        for x0, y0 in origins:
            glass.paint_code(f, k, x0, y0)
        return f

    def put(f: np.ndarray) -> None:
        images.put(f.data)  # (H, W, 4) BGRx
        images.round_trip()  # drawn before the next frame

    put(frame(0))
    times: list[float] = []
    trips: list[float] = []

    class Producer(Paced):
        def draw(self, k: int) -> None:
            f = frame(k)
            t = time.monotonic()
            put(f)
            times.append(t)
            trips.append(time.monotonic() - t)

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    cpu0 = time.process_time()
    with Producer(config["fps"]):
        sys.stdin.readline()  # "stop" (or EOF)
    cpu = time.process_time() - cpu0
    print(json.dumps({"times": times, "round_trip_s": trips, "cpu": cpu}), flush=True)
    images.close()


class Drawer:
    def __init__(self, display: str, width: int, height: int, fps: int):
        config = dict(display=display, width=width, height=height, fps=fps)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--draw-child",
                                      json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"drawing client did not start (said {line!r})")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 15) -> dict:
        out, _ = self.proc.communicate("stop\n", timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# -- one case --------------------------------------------------------------------------------------
def pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def summarise(times: list[float], transitions: list, n_strips: int, t0: float, seconds: float) -> dict:
    firsts: list[dict[int, float]] = [{} for _ in range(n_strips)]
    highest = [-1] * n_strips
    misreads = out_of_order = 0
    for item in transitions:
        i, v, t = (item if len(item) == 3 else (0, *item))
        before = bisect.bisect_right(times, t)  # frames 0 .. before-1 were stamped by then
        if before - 1 < v:
            misreads += 1  # a number not yet drawn: a misread that passed the check
            continue
        k = v + glass.MODULUS * ((before - 1 - v) // glass.MODULUS)
        if k < highest[i]:
            out_of_order += 1
        highest[i] = max(highest[i], k)
        firsts[i].setdefault(k, t)
    first = {k: max(f[k] for f in firsts) for k in firsts[0] if all(k in f for f in firsts)}
    window = [k for k, t in enumerate(times) if t0 + 1.0 <= t < t0 + seconds]
    shown = [k for k in window if k in first]
    latency = [(first[k] - times[k]) * 1000 for k in shown]
    gaps, run = [], 0
    for k in window:
        if k in first:
            if run:
                gaps.append(run)
            run = 0
        else:
            run += 1
    if run:
        gaps.append(run)
    return {
        "frames_drawn": len(window), "frames_shown": len(shown),
        "shown_share": round(len(shown) / max(1, len(window)), 3),
        "latency_ms": {"p50": pct(latency, 50), "p95": pct(latency, 95),
                       "max": round(max(latency), 1) if latency else None,
                       "min": round(min(latency), 1) if latency else None},
        "never_shown_runs": {"count": len(gaps), "longest": max(gaps, default=0)},
        "out_of_order_sightings": out_of_order, "misreads": misreads,
    }


def run_case(side: str, codec: str, screen: tuple[int, int], fps: int, seconds: float, warmup: float,
             mode: str, log_dir: Path, count_calls: bool = False, served_x: str = "session") -> dict:
    import xclient

    width, height = CONTENT
    case_dir = log_dir / f"{side}-{codec}"
    served = drawer = capturer = None
    calls = None
    try:
        if side == "spicestream":
            served = Spicestream(codec, screen, case_dir, count_calls, served_x)
        else:
            served = Xspice(codec, screen, case_dir)
        counting = getattr(served, "calls_path", None) is not None
        drawer = Drawer(served.display, width, height, fps)
        with xclient.XSession(*VIEWER_SCREEN, log_dir=case_dir / "viewer") as x:
            viewer = x.start_viewer(f"spice://127.0.0.1:{served.port}", "--zoom=100")
            x.find_window(viewer, timeout=20)
            x.run("xdotool", "mousemove", str(VIEWER_SCREEN[0] - 1), str(VIEWER_SCREEN[1] - 1), check=False)
            mapping = xclient.wait_until(lambda: glass.locate(x.screenshot(), width, height), 20, 0.3,
                                         "the content on the viewer's screen")
            origins = strip_origins(width, height)
            strips = [glass.strip_geometry(mapping, x0, y0) for x0, y0 in origins]
            if len(strips) == 1 and not hasattr(glass, "strip_origins"):
                capturer = glass.Capturer(x, strips[0], mode, 0.0)  # older glass.py: one strip
            else:
                capturer = glass.Capturer(x, strips, mode, 0.0)
            drawer.go()
            time.sleep(warmup)  # streams start, encoders settle
            server_pids = served.server_pids()
            client_pids = {"remote_viewer": viewer.pid, "viewer_xvfb": x.xvfb.pid,
                           "capturer": capturer.proc.pid, "drawing_client": drawer.proc.pid}
            if counting:
                served.proc.send_signal(signal.SIGUSR1)
            t0 = time.monotonic()
            cpu_a = {k: cpu_seconds(p) for k, p in {**server_pids, **client_pids}.items()}
            threads_a = {k: thread_cpu(p) for k, p in server_pids.items()}
            faults_a = {k: minor_faults(p) for k, p in server_pids.items()}
            w_a = tcp_bytes_sent(served.port)
            busy_a = machine_busy()
            capturer.go(t0 + seconds + 1.0)
            time.sleep(max(0.0, t0 + seconds - time.monotonic()))
            t1 = time.monotonic()
            cpu_b = {k: cpu_seconds(p) for k, p in {**server_pids, **client_pids}.items()}
            threads_b = {k: thread_cpu(p) for k, p in server_pids.items()}
            faults_b = {k: minor_faults(p) for k, p in server_pids.items()}
            w_b = tcp_bytes_sent(served.port)
            busy_b = machine_busy()
            if counting:
                served.proc.send_signal(signal.SIGUSR2)
                calls = xclient.wait_until(lambda: read_calls(served.calls_path), 10, 0.1, "the call counts")
            libs = loaded_libraries(viewer.pid)
            time.sleep(1.0)
            seen = capturer.result(timeout=20)
            drawn = drawer.finish()
            if viewer.poll() is not None:
                raise RuntimeError(f"remote-viewer exited with rc={viewer.returncode}")
    finally:
        for part in (capturer, drawer, served):
            if part is not None:
                part.close()
    elapsed = t1 - t0
    drawn_in_window = sum(1 for t in drawn["times"] if t0 <= t < t1)  # what the CPU window paid for
    used = {k: round(cpu_b[k] - cpu_a[k], 2) for k in cpu_a if cpu_a[k] is not None and cpu_b[k] is not None}
    server_cpu = round(sum(used[k] for k in server_pids if k in used), 2)
    row = {"side": side, "codec": codec, "video_codecs": CODECS[codec], "seconds": round(elapsed, 2),
           **summarise(drawn["times"], seen["transitions"], len(strips), t0, seconds)}
    row.update({
        "server_cpu_s": server_cpu,
        "server_cpu_share": round(server_cpu / elapsed, 3),
        "server_cpu_by_process_s": {k: used.get(k) for k in server_pids},
        "server_threads": {k: thread_cpu_delta(threads_a[k], threads_b[k], drawn_in_window)
                           for k in server_pids},
        "server_minor_faults_per_frame": {k: round((faults_b[k] - faults_a[k]) / max(1, drawn_in_window), 1)
                                          for k in server_pids if None not in (faults_a[k], faults_b[k])},
        "client_cpu_s": {k: used.get(k) for k in client_pids},
        "machine_busy_share": round((busy_b[0] - busy_a[0]) / max(1, busy_b[1] - busy_a[1]), 3),
        "server_tcp_bytes_per_s": round((w_b - w_a) / elapsed) if w_a is not None and w_b is not None else None,
        "draw_round_trip_ms": {"p50": pct(np.array(drawn["round_trip_s"]) * 1000, 50),
                               "p95": pct(np.array(drawn["round_trip_s"]) * 1000, 95)},
        "capture": {"mode": mode, "grabs": seen["grabs"], "unreadable_grabs": seen["unreadable"],
                    "cpu_share": round(seen["cpu"] / max(seen["elapsed"], 1e-9), 2)},
        "viewer": {"scale": [round(mapping[0], 3), round(mapping[1], 3)],
                   "origin": [round(mapping[2], 1), round(mapping[3], 1)], "decoder_libs": libs},
        "server_notes": served.notes(),
    })
    if calls is not None:
        frames = max(1, drawn_in_window)
        row["python_calls_per_frame"] = {t: round(n / frames, 1) for t, n in sorted(
            calls["totals"].items(), key=lambda kv: -kv[1]) if n >= frames / 10}
        row["python_calls_top"] = {t: [[caller, callee, round(n / frames, 2)] for caller, callee, n in rows[:20]]
                                   for t, rows in calls["top"].items() if t in row["python_calls_per_frame"]}
        row["python_calls_note"] = ("counted with a profile hook (bench/callcount.py): CPU and latency "
                                    "figures of this run are not comparable")
    return row


def read_calls(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or half written
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--codecs", default="h264,mjpeg", help=f"comma-separated: {', '.join(CODECS)}")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: spicestream, xspice")
    parser.add_argument("--screen", default="x".join(map(str, CONTENT)),
                        help="size of the served X screen (the 640x360 window is at its top-left)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of drawing before the window")
    parser.add_argument("--capture", choices=("damage", "spin"), default="damage",
                        help="glass.py's capturer: read the strips when the viewer's Xvfb reports them "
                             "drawn (little CPU), or as fast as possible (a core on its own)")
    parser.add_argument("--log-dir", help="keep logs here (default: a temporary folder)")
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--served-x", choices=("session", "plain"), default="session",
                        help="spicestream's served Xvfb: the one `spicestream run` starts, or one started "
                             "the default way")
    parser.add_argument("--count-calls", action="store_true",
                        help="count the Python calls per frame of spicestream's threads (bench/callcount.py); "
                             "the hook slows the server, so its CPU and latency figures are not comparable")
    parser.add_argument("--draw-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.draw_child:
        draw_child(json.loads(args.draw_child))
        return
    import xclient
    missing = xclient.missing_tools(("Xvfb", "remote-viewer", "xdotool", "import", "Xorg"))
    if missing:
        parser.error(f"needs {', '.join(missing)}")
    if not Path("/usr/lib/xorg/modules/drivers/spiceqxl_drv.so").exists():
        parser.error("needs xserver-xspice (spiceqxl_drv.so)")
    codecs = [c for c in args.codecs.split(",") if c]
    sides = [s for s in args.sides.split(",") if s]
    for c in codecs:
        if c not in CODECS:
            parser.error(f"bad codec {c!r}: one of {', '.join(CODECS)}")
    for s in sides:
        if s not in SIDES:
            parser.error(f"bad side {s!r}: one of {', '.join(SIDES)}")
    screen = tuple(int(v) for v in args.screen.split("x"))
    if screen[0] < CONTENT[0] or screen[1] < CONTENT[1]:
        parser.error(f"screen must be at least {CONTENT[0]}x{CONTENT[1]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="glass-x11-") as tmp:
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
        for codec in codecs:
            for side in sides:
                try:
                    row = run_case(side, codec, screen, args.fps, args.seconds, args.warmup, args.capture,
                                   log_dir, args.count_calls, args.served_x)
                except Exception as exc:  # one case failing is a result too
                    row = {"side": side, "codec": codec, "error": f"{type(exc).__name__}: {exc}"}
                results.append(row)
                brief = {k: row.get(k) for k in ("side", "codec", "shown_share", "latency_ms",
                                                 "server_cpu_s", "error") if k in row}
                print(json.dumps(brief), file=sys.stderr, flush=True)
    comparison = {}
    for codec in codecs:
        rows = {r["side"]: r for r in results if r["codec"] == codec and "error" not in r}
        if len(rows) == 2:
            a, b = rows["spicestream"], rows["xspice"]
            comparison[codec] = {
                "latency_p50_ms": {"spicestream": a["latency_ms"]["p50"], "xspice": b["latency_ms"]["p50"]},
                "latency_p95_ms": {"spicestream": a["latency_ms"]["p95"], "xspice": b["latency_ms"]["p95"]},
                "shown_share": {"spicestream": a["shown_share"], "xspice": b["shown_share"]},
                "server_cpu_s": {"spicestream": a["server_cpu_s"], "xspice": b["server_cpu_s"]},
                "cpu_ratio_spicestream_over_xspice":
                    round(a["server_cpu_s"] / b["server_cpu_s"], 2) if b["server_cpu_s"] else None,
            }
    out = json.dumps({
        "metric": "PutImage on the served X display -> first sighting on remote-viewer's screen (its "
                  "Xvfb framebuffer), ms; server CPU s over the window",
        "content": f"{CONTENT[0]}x{CONTENT[1]} window at {args.fps} fps", "screen": args.screen,
        "seconds": args.seconds, "capture": args.capture, "served_x": args.served_x, "cores": os.cpu_count(),
        "comparison": comparison, "results": results}, indent=2, default=str)
    print(out)
    if args.output:
        Path(args.output).write_text(out + "\n")


if __name__ == "__main__":
    main()
