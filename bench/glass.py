"""Glass-to-glass latency, real client: display.update -> picture on remote-viewer's screen; prints JSON.

    .venv/bin/python bench/glass.py [--seconds 10] [--cases h264:640x360:30,lossless:1280x720:60,...]
                                    [--capture spin|damage] [--grab-interval-ms 0] [--repeat 1] [--per-frame]

The application draws numbered frames through the public API (`Server(...).start()`,
`display.update(frame, damage)`) at a steady `fps`, paced by deadline: every frame is moving
texture (precomputed) plus the frame number painted as a strip of 16 black/white 32 px cells
(12 bits and a 4-bit check, like tests/framecode.py but with bigger cells on macroblock
boundaries). The producer stamps `time.monotonic()` just before each `display.update`.

remote-viewer (virt-viewer) runs under Xvfb (tests/xclient.XSession, a 1920x1080 screen) and
connects to spice://127.0.0.1:PORT. The display is located on the screen once, from corner
markers in a still (lossless) first frame; from then on a capturer in a separate process (its
own X connection, MIT-SHM) reads only the 3 screen rows through the centres of the strip's
cells, as fast as it can (`--capture spin`, the default), or each time the X server reports
that the strip's rows were drawn (`--capture damage`: the DAMAGE extension, little CPU). It
stamps each change of the number read with CLOCK_MONOTONIC (the same clock as the producer's,
system-wide), at the middle of the grab that first showed it.

Latency of frame k = its first sighting - its update. Over the frames updated after the first
second of the `--seconds` window; the capturer keeps looking for 1 s more so late frames are
not counted as lost. `frames_shown` / `shown_share`: distinct frame numbers seen among the
frames produced in that window (a frame the server skipped, or the client replaced before it
was drawn, is never seen). Cases: codec:WxH:fps, codec one of h264 (gstreamer:h264), vp8
(gstreamer:vp8), mjpeg (spice:mjpeg), lossless (streaming_video="off"). The video cases use
streaming_video="all" and full-screen damage, as a video player would.

"Glass" here is Xvfb's framebuffer: no compositor, no vsync, no display scan-out. On this
2-core machine the spinning capturer itself takes most of a core (and Xvfb ~0.2 more) from
the server and the client; `cpu_cores` gives, per case, the cores used by this process (server
and producer), remote-viewer, the client's Xvfb, the capturer, and everything else on the
machine (`contended`: over 0.15 cores; before each case the benchmark waits, up to
`--quiet-wait` s, for the machine to go quiet). Compare with `--capture damage`: VP8 here
suffers badly from the spinning capturer.

Within one run a stream's latency is steady to about a millisecond, but from run to run its
level moves by up to ~17 ms (it seems locked to a ~60 Hz tick on the client's side whose phase
against the producer is chance): compare stream cases over several runs (`--repeat`), not one.
The stream's `lead_ms` and `last_margin_ms` (in `server`) say how long the client held the
frames for their stamps: a margin of a few ms, with a lead below zero where remote-viewer's
clock started behind ours.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # xclient, helpers (nothing there imports pytest)

CODECS = {"h264": "gstreamer:h264", "vp8": "gstreamer:vp8", "mjpeg": "spice:mjpeg", "lossless": None}
DEFAULT_CASES = [f"{c}:{s}:{f}" for c in ("h264", "vp8", "mjpeg", "lossless")
                 for s in ("640x360", "1280x720") for f in (30, 60)]
SCREEN = (1920, 1080)

# -- the frame-number strip ------------------------------------------------------------------------
BITS, CHECK_BITS = 12, 4
CELLS = BITS + CHECK_BITS
CELL = 32  # px on the surface; cell edges on 16 px (macroblock) boundaries
STRIP_W, STRIP_H = CELLS * CELL, CELL
MODULUS = 1 << BITS
MARKER = 64
MARKERS = {  # corner squares (top-left offsets -> RGB), found on the screen once
    "tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 0)}
PATCH = 5  # columns per cell centre that the capturer averages, over 3 rows
HI, LO = 170, 85  # cell centre levels: >= HI white, <= LO black, between: unreadable


def check(k: int) -> int:
    k &= MODULUS - 1
    return (k ^ (k >> 4) ^ (k >> 8) ^ 0b1010) & 0xF


def code_bits(k: int) -> list[int]:
    k &= MODULUS - 1
    value = k | (check(k) << BITS)
    return [(value >> i) & 1 for i in range(CELLS)]


def strip_origins(width: int, height: int) -> list[tuple[int, int]]:
    """Top-left corners of the two strips: one near the top of the display, one near the
    bottom (a frame is shown when both are); on 16 px boundaries, clear of the markers."""
    x = ((width - STRIP_W) // 2) // 16 * 16
    return [(x, 16), (x, (height - 16 - STRIP_H) // 16 * 16)]


def marker_origins(width: int, height: int) -> dict[str, tuple[int, int]]:
    return {"tl": (0, 0), "tr": (width - MARKER, 0), "bl": (0, height - MARKER),
            "br": (width - MARKER, height - MARKER)}


def paint_code(frame: np.ndarray, k: int, x0: int, y0: int) -> None:
    for i, bit in enumerate(code_bits(k)):
        frame[y0:y0 + CELL, x0 + i * CELL:x0 + (i + 1) * CELL, :3] = 255 if bit else 0


def base_frames(width: int, height: int, count: int = 16) -> list[np.ndarray]:
    """Moving texture (16 px random blocks scrolling 12 px a frame, a drifting shade), kept to
    levels 64..192 so no texture pixel looks like a marker or a code cell; markers on top."""
    rng = np.random.default_rng(0)
    small = rng.integers(64, 161, (-(-height // 16), -(-width // 16), 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)[:height, :width]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    frames = []
    for i in range(count):
        frame = np.empty((height, width, 4), np.uint8)
        shade = (y * 16 * (1 + np.sin(i * 2 * np.pi / count))).astype(np.uint8)
        frame[..., :3] = np.roll(texture, i * 12, axis=1) + shade
        frame[..., 3] = 255
        for name, (x, yy) in marker_origins(width, height).items():
            r, g, b = MARKERS[name]
            frame[yy:yy + MARKER, x:x + MARKER, :3] = (b, g, r)
        frames.append(frame)
    return frames


# -- finding the display on the screen (once, on a still lossless frame) ---------------------------
def blob_centre(shot: np.ndarray, rgb, tol: int = 40):
    match = (np.abs(shot.astype(np.int16) - np.array(rgb, np.int16)) <= tol).all(axis=2)
    if match.sum() < 200:
        return None
    ys, xs = np.nonzero(match)
    return float(xs.mean()), float(ys.mean())


def locate(shot: np.ndarray, width: int, height: int):
    """(scale x, scale y, screen x of surface 0, screen y of surface 0), from the markers."""
    centres = {name: blob_centre(shot, rgb) for name, rgb in MARKERS.items()}
    if any(c is None for c in centres.values()):
        return None
    (x0, y0), (x1, _), (_, y1) = centres["tl"], centres["tr"], centres["bl"]
    sx, sy = (x1 - x0) / (width - MARKER), (y1 - y0) / (height - MARKER)
    if sx <= 0 or sy <= 0:
        return None
    return sx, sy, x0 - (MARKER - 1) / 2 * sx, y0 - (MARKER - 1) / 2 * sy  # pixel centres


def strip_geometry(mapping, x0: int, y0: int) -> dict:
    """The screen rectangle the capturer grabs for the strip at surface (x0, y0) (3 rows through
    the cell centres, from the first cell's centre patch to the last's) and, inside it, the
    columns of each cell's patch."""
    sx, sy, ox, oy = mapping
    centres = [ox + (x0 + i * CELL + (CELL - 1) / 2) * sx for i in range(CELLS)]
    cy = int(round(oy + (y0 + (CELL - 1) / 2) * sy))
    left = int(round(centres[0])) - PATCH // 2
    right = int(round(centres[-1])) + PATCH // 2 + 1
    columns = [int(round(c)) - PATCH // 2 - left + j for c in centres for j in range(PATCH)]
    return {"x": left, "y": cy - 1, "width": right - left, "height": 3, "columns": columns}


def read_code(levels: np.ndarray) -> int | None:
    """The number from the 16 cell levels (0..255), or None when unreadable or the check fails."""
    ones = levels >= HI
    if ((levels > LO) & ~ones).any():
        return None
    value = int(ones.astype(np.int64) @ (1 << np.arange(CELLS, dtype=np.int64)))
    k = value & (MODULUS - 1)
    return k if value >> BITS == check(k) else None


# -- the capturer (a child process: `glass.py --capture-child CONFIG`) ----------------------------
def capture_child(config: dict) -> None:
    """Connect to the X display, prepare, say 'ready'; on 'go T_END' grab the strip rows until
    T_END; print JSON: every change of the number read, as [number, monotonic time]."""
    import ctypes

    import xcffib
    import xcffib.damage  # extensions must be imported before connecting: their events register then
    import xcffib.shm
    import xcffib.xproto

    conn = xcffib.connect(display=config["display"])
    root = conn.get_setup().roots[0].root
    strips = config["strips"]
    offsets, size = [], 0
    for strip in strips:
        offsets.append(size)
        size += strip["width"] * strip["height"] * 4
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    shmid = libc.shmget(0, size, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    addr = libc.shmat(shmid, None, 0)
    shm = conn(xcffib.shm.key)
    seg = conn.generate_id()
    try:
        shm.AttachChecked(seg, shmid, False).check()
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID: freed when both sides detach
    memory = np.frombuffer((ctypes.c_ubyte * size).from_address(addr), np.uint8)
    zpixmap = xcffib.xproto.ImageFormat.ZPixmap
    get_image = shm.GetImage
    mono = time.monotonic
    jobs = []  # (request arguments, pixels, patch columns, 1 / samples per cell)
    for strip, offset in zip(strips, offsets):
        x, y, w, h = strip["x"], strip["y"], strip["width"], strip["height"]
        pixels = memory[offset:offset + w * h * 4].reshape(h, w, 4)
        jobs.append(((root, x, y, w, h, 0xFFFFFFFF, zpixmap, seg, offset), pixels,
                     np.array(strip["columns"], np.intp), 1.0 / (h * PATCH * 3)))

    def grab() -> tuple[list[int | None], float, float]:
        """Both strips in one round trip (two requests, then both replies)."""
        t_a = mono()
        cookies = [get_image(*request) for request, _, _, _ in jobs]
        for cookie in cookies:
            cookie.reply()
        t_b = mono()
        codes = []
        for _, pixels, columns, scale in jobs:
            levels = pixels[:, columns, :3].reshape(pixels.shape[0], CELLS, PATCH, 3).sum(
                axis=(0, 2, 3), dtype=np.int64) * scale
            codes.append(read_code(levels))
        return codes, (t_a + t_b) / 2, t_b - t_a

    damage = None
    if config["mode"] == "damage":
        damage = conn(xcffib.damage.key)
        damage.QueryVersion(1, 1).reply()
        damage.Create(conn.generate_id(), root, xcffib.damage.ReportLevel.RawRectangles)
        conn.flush()
    grab()  # warm up
    print("ready", flush=True)
    t_end = float(sys.stdin.readline().split()[1])
    interval = config["interval"]
    transitions, last = [], [None] * len(strips)
    grabs = unreadable = 0
    grab_time = 0.0
    events = hits = 0
    fd = conn.get_file_descriptor()
    cpu0, wall0 = time.process_time(), mono()
    while True:
        if damage is not None:
            hit = False
            while (event := conn.poll_for_event()) is not None:
                events += 1
                a = getattr(event, "area", None)
                if a is not None and any(
                        r["x"] < a.x + a.width and a.x < r["x"] + r["width"]
                        and r["y"] < a.y + a.height and a.y < r["y"] + r["height"] for r in strips):
                    hit = True
            if not hit:
                left = t_end - mono()
                if left <= 0:
                    break
                select.select([fd], [], [], min(left, 0.05))
                continue
            hits += 1
        elif mono() >= t_end:
            break
        codes, t, dt = grab()
        grabs += 1
        grab_time += dt
        for i, k in enumerate(codes):
            if k is None:
                unreadable += 1
            elif k != last[i]:
                transitions.append([i, k, t])
                last[i] = k
        if interval:
            time.sleep(interval)
        if damage is not None and mono() >= t_end:
            break
    elapsed, cpu = mono() - wall0, time.process_time() - cpu0
    shm.Detach(seg)
    conn.disconnect()
    print(json.dumps({"transitions": transitions, "grabs": grabs, "unreadable": unreadable,
                      "elapsed": elapsed, "cpu": cpu, "grab_time": grab_time,
                      "damage_events": events, "damage_hits": hits}), flush=True)


class Capturer:
    """The capture child, started and made ready before the measurement window opens."""

    def __init__(self, x, strips: list[dict], mode: str, interval_ms: float):
        config = dict(strips=strips, display=x.display, mode=mode, interval=interval_ms / 1000)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--capture-child",
                                      json.dumps(config)], env=x.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"capturer did not start (said {line!r})")

    def go(self, t_end: float) -> None:
        self.proc.stdin.write(f"go {t_end!r}\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# -- CPU accounting: ours, and everybody else's (a benchmark running beside this one) ---------------
TICK = os.sysconf("SC_CLK_TCK")


def busy_ticks() -> int:
    """Busy CPU time of the whole machine (all cores), in clock ticks, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """CPU used over a window by named processes, and by the rest of the machine."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.start = (time.monotonic(), busy_ticks(), {n: process_ticks(p) for n, p in pids.items()})

    def shares(self) -> dict:
        t0, busy0, own0 = self.start
        wall = time.monotonic() - t0
        own = {n: (process_ticks(p) - own0[n]) / TICK / wall for n, p in self.pids.items()}
        other = (busy_ticks() - busy0) / TICK / wall - sum(own.values())
        return {**{n: round(v, 2) for n, v in own.items()}, "everything_else": round(max(0.0, other), 2)}


def wait_for_quiet(limit_s: float, threshold: float = 0.25) -> float:
    """Wait (up to `limit_s`) until the rest of the machine uses under `threshold` cores over a
    second; return the seconds waited."""
    started = time.monotonic()
    while True:
        t, busy = time.monotonic(), busy_ticks()
        time.sleep(1.0)
        load = (busy_ticks() - busy) / TICK / (time.monotonic() - t)
        if load < threshold or time.monotonic() - started >= limit_s:
            return round(time.monotonic() - started - 1.0, 1)
        print(f"waiting for a quiet machine ({load:.2f} cores busy elsewhere)", file=sys.stderr, flush=True)


# -- one case --------------------------------------------------------------------------------------
class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def run_case(codec: str, width: int, height: int, fps: int, seconds: float, mode: str,
             interval_ms: float, log_dir: Path) -> dict:
    import spicestream
    import xclient
    from helpers import Paced

    streaming = "off" if CODECS[codec] is None else "all"
    options = {"video_codecs": CODECS[codec]} if CODECS[codec] else {}
    server = spicestream.Server(port=0, width=width, height=height, streaming_video=streaming,
                                **options).start()
    warnings = Warnings()
    logging.getLogger("spicestream").addHandler(warnings)
    bases = base_frames(width, height)
    origins = strip_origins(width, height)
    damage = [(0, 0, width, height)]
    times: list[float] = []
    spent: list[float] = []

    class Producer(Paced):
        def draw(self, k: int) -> None:
            t = time.monotonic()
            frame = bases[k % len(bases)].copy()
            for x0, y0 in origins:
                paint_code(frame, k, x0, y0)
            times.append(time.monotonic())
            server.display.update(frame, damage)
            spent.append(time.monotonic() - t)

    still = bases[0].copy()
    for x0, y0 in origins:
        paint_code(still, 0, x0, y0)
    server.display.update(still, damage)
    producer = Producer(fps)
    capturer = None
    case_dir = log_dir / f"{codec}-{width}x{height}-{fps}"
    try:
        with xclient.XSession(*SCREEN, log_dir=case_dir) as x:
            viewer = x.start_viewer(f"spice://127.0.0.1:{server.port}", "--zoom=100")
            window = x.find_window(viewer)
            x.run("xdotool", "mousemove", str(SCREEN[0] - 1), str(SCREEN[1] - 1), check=False)
            mapping = xclient.wait_until(lambda: locate(x.screenshot(), width, height), 20, 0.3,
                                         "the display on the screen")
            strips = [strip_geometry(mapping, x0, y0) for x0, y0 in origins]
            capturer = Capturer(x, strips, mode, interval_ms)
            with producer:
                if streaming == "all":
                    xclient.wait_until(lambda: active_stream(server, fps), 20, 0.1, "a stream with frames")
                time.sleep(0.5)
                t0 = time.monotonic()
                meter = CpuMeter({"server_and_producer": os.getpid(), "remote_viewer": viewer.pid,
                                  "client_xvfb": x.xvfb.pid, "capturer": capturer.proc.pid})
                capturer.go(t0 + seconds + 1.0)
                time.sleep(seconds)
                stats = server.stats()
                cpu = meter.shares()
                time.sleep(1.0)
                seen = capturer.result(timeout=15)
            window_geometry = x.geometry(window)
    finally:
        if capturer is not None:
            capturer.close()
        logging.getLogger("spicestream").removeHandler(warnings)
        server.stop()
    client_log = (case_dir / "remote-viewer.log")
    client_lines = client_log.read_text(errors="replace").splitlines() if client_log.exists() else []
    row = summarise(codec, width, height, fps, seconds, mode, t0, times, spent, seen, stats, mapping,
                    window_geometry, warnings.messages, client_lines)
    row["cpu_cores"] = cpu
    row["contended"] = cpu["everything_else"] > 0.15
    return row


def active_stream(server, min_frames: int = 0):
    clients = server.stats()["clients"]
    active = clients[0].get("streams", {}).get("active") if clients else None
    return active if active and active["frames_sent"] > min_frames else None


def summarise(codec, width, height, fps, seconds, mode, t0, times, spent, seen, stats, mapping,
              window_geometry, warnings, client_lines) -> dict:
    firsts: list[dict[int, float]] = [{}, {}]  # per strip (top, bottom): frame -> first sighting
    impossible = out_of_order = 0
    highest = [-1, -1]
    for i, v, t in seen["transitions"]:
        before = bisect.bisect_right(times, t)  # frames 0 .. before-1 were updated by then
        if before - 1 < v:
            impossible += 1  # a number not yet drawn: a misread that passed the check
            continue
        k = v + MODULUS * ((before - 1 - v) // MODULUS)
        if k < highest[i]:
            out_of_order += 1
        highest[i] = max(highest[i], k)
        firsts[i].setdefault(k, t)
    # A frame is shown once both its top and its bottom strip have been on the screen.
    first = {k: max(t, firsts[1][k]) for k, t in firsts[0].items() if k in firsts[1]}
    window = [k for k, t in enumerate(times) if t0 + 1.0 <= t < t0 + seconds]
    shown = [k for k in window if k in first]
    partly = sum((k in firsts[0]) != (k in firsts[1]) for k in window)
    latency = np.array([(first[k] - times[k]) * 1000 for k in shown]) if shown else np.zeros(1)
    top = np.array([(firsts[0][k] - times[k]) * 1000 for k in window if k in firsts[0]] or [0.0])
    spread = np.array([(firsts[1][k] - firsts[0][k]) * 1000 for k in shown] or [0.0])
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
    sx, sy, ox, oy = mapping
    clients = stats["clients"]
    client = clients[0] if clients else {}
    streams = client.get("streams") or {}
    row = {
        "codec": codec, "size": f"{width}x{height}", "fps": fps, "seconds": seconds,
        "frames_produced": len(window), "frames_shown": len(shown),
        "shown_share": round(len(shown) / max(1, len(window)), 3),
        "latency_ms": {"p50": pct(latency, 50), "p95": pct(latency, 95),
                       "max": round(float(latency.max()), 1), "min": round(float(latency.min()), 1)},
        "top_strip_latency_ms": {"p50": pct(top, 50), "p95": pct(top, 95)},
        "bottom_minus_top_ms": {"p50": pct(spread, 50), "max": round(float(spread.max()), 1)},
        "frames_shown_in_one_strip_only": partly,
        "per_frame_ms": [round(float(v), 1) for v in latency] if shown else [],
        "never_shown_runs": {"count": len(gaps), "longest": max(gaps, default=0)},
        "out_of_order_sightings": out_of_order, "misreads": impossible,
        "capture": {"mode": mode, "grabs": seen["grabs"],
                    "grabs_per_s": round(seen["grabs"] / max(seen["elapsed"], 1e-9)),
                    "grab_ms_mean": round(seen["grab_time"] / max(1, seen["grabs"]) * 1000, 3),
                    "unreadable_grabs": seen["unreadable"],
                    "cpu_share": round(seen["cpu"] / max(seen["elapsed"], 1e-9), 2)},
        "screen": {"scale": [round(sx, 3), round(sy, 3)], "origin": [round(ox, 1), round(oy, 1)],
                   "window": list(window_geometry)},
        # the producer's cost per frame: copy a precomputed picture, paint the strips, update()
        "producer_update_ms": {"p50": pct(np.array(spent) * 1000, 50),
                               "p95": pct(np.array(spent) * 1000, 95)},
        "server": {"bytes_sent": client.get("bytes_sent"), "stream": streams.get("active"),
                   "ended_streams": len(streams.get("ended", [])),
                   "failed_codecs": streams.get("failed_codecs")},
        "server_warnings": {"count": len(warnings), "first": warnings[:5]},
        "client_log": {"lines": len(client_lines), "last": client_lines[-5:]},
    }
    if mode == "damage":
        row["capture"].update(damage_events=seen["damage_events"], damage_hits=seen["damage_hits"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="codec:WxH:fps entries, comma-separated; codec: h264, vp8, mjpeg, lossless")
    parser.add_argument("--capture", choices=("spin", "damage"), default="spin",
                        help="grab the strip as fast as possible, or when X reports it drawn")
    parser.add_argument("--grab-interval-ms", type=float, default=0.0,
                        help="with --capture spin: sleep this long between grabs (0: none)")
    parser.add_argument("--log-dir", help="keep Xvfb/remote-viewer logs here (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every case this many times (rows get a 'run' number)")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="before each case, wait up to this many seconds for the rest of the machine "
                             "to go quiet (under 0.25 cores busy)")
    parser.add_argument("--per-frame", action="store_true",
                        help="also list every shown frame's latency (ms, in frame order)")
    parser.add_argument("--capture-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture_child:
        capture_child(json.loads(args.capture_child))
        return
    import xclient
    missing = xclient.missing_tools()
    if missing:
        parser.error(f"needs {', '.join(missing)}")
    cases = []
    for case in args.cases.split(","):
        try:
            codec, size, fps = case.split(":")
            width, height = (int(v) for v in size.split("x"))
            cases.append((codec, width, height, int(fps)))
        except ValueError:
            parser.error(f"bad case {case!r}: expected codec:WxH:fps")
        if codec not in CODECS:
            parser.error(f"bad codec {codec!r}: one of {', '.join(CODECS)}")
        if width < STRIP_W + 2 * MARKER or height < 2 * MARKER + STRIP_H:
            parser.error(f"size {size} too small for the strip and markers")
    with tempfile.TemporaryDirectory(prefix="glass-") as tmp:
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
        results = []
        for (codec, width, height, fps), run in ((case, i) for case in cases for i in range(args.repeat)):
            waited = wait_for_quiet(args.quiet_wait)
            try:
                row = run_case(codec, width, height, fps, args.seconds, args.capture, args.grab_interval_ms,
                               log_dir)
            except Exception as exc:  # one case failing (a missing decoder, a timeout) is a result too
                row = {"codec": codec, "size": f"{width}x{height}", "fps": fps,
                       "error": f"{type(exc).__name__}: {exc}"}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                continue
            if not args.per_frame:
                row.pop("per_frame_ms")
            if args.repeat > 1:
                row["run"] = run
            row["waited_for_quiet_s"] = waited
            results.append(row)
            print(json.dumps({k: row[k] for k in ("codec", "size", "fps", "shown_share", "latency_ms")}
                             | {"grabs_per_s": row["capture"]["grabs_per_s"], "cpu_cores": row["cpu_cores"]}),
                  file=sys.stderr, flush=True)
    print(json.dumps({"metric": "display.update -> first sighting of the frame on remote-viewer's screen "
                                "(Xvfb framebuffer), ms",
                      "capture": args.capture, "cores": os.cpu_count(), "results": results},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
