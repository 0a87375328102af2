"""Glass-to-glass latency with a real client: display.update -> picture on remote-viewer's screen; prints JSON.

    .venv/bin/python bench/glass.py [--seconds 10] [--cases h264:640x360:30,lossless:1280x720:60,...]
                                    [--capture spin|damage] [--grab-interval-ms 0]

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
2-core machine the spinning capturer itself takes most of a core from the server, the client
and Xvfb; `capture.cpu_share` says how much (compare with `--capture damage`).
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


def strip_origin(width: int) -> tuple[int, int]:
    return ((width - STRIP_W) // 2) // 16 * 16, 16


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


def strip_geometry(mapping, width: int) -> dict:
    """The screen rectangle the capturer grabs (3 rows through the cell centres, from the first
    cell's centre patch to the last's) and, inside it, the columns of each cell's patch."""
    sx, sy, ox, oy = mapping
    x0, y0 = strip_origin(width)
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
    import xcffib.shm
    import xcffib.xproto

    conn = xcffib.connect(display=config["display"])
    root = conn.get_setup().roots[0].root
    x, y, w, h = config["x"], config["y"], config["width"], config["height"]
    size = w * h * 4
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
    pixels = np.frombuffer((ctypes.c_ubyte * size).from_address(addr), np.uint8).reshape(h, w, 4)
    columns = np.array(config["columns"], np.intp)
    zpixmap = xcffib.xproto.ImageFormat.ZPixmap
    get_image = shm.GetImage
    mono = time.monotonic
    scale = 1.0 / (h * PATCH * 3)

    def grab() -> tuple[int | None, float, float]:
        t_a = mono()
        get_image(root, x, y, w, h, 0xFFFFFFFF, zpixmap, seg, 0).reply()
        t_b = mono()
        levels = pixels[:, columns, :3].reshape(h, CELLS, PATCH, 3).sum(axis=(0, 2, 3),
                                                                         dtype=np.int64) * scale
        return read_code(levels), (t_a + t_b) / 2, t_b - t_a

    damage = None
    if config["mode"] == "damage":
        import xcffib.damage
        damage = conn(xcffib.damage.key)
        damage.QueryVersion(1, 1).reply()
        damage.Create(conn.generate_id(), root, xcffib.damage.ReportLevel.RawRectangles)
        conn.flush()
    grab()  # warm up
    print("ready", flush=True)
    t_end = float(sys.stdin.readline().split()[1])
    interval = config["interval"]
    transitions, last = [], None
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
                if a is not None and a.x < x + w and x < a.x + a.width and a.y < y + h and y < a.y + a.height:
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
        k, t, dt = grab()
        grabs += 1
        grab_time += dt
        if k is None:
            unreadable += 1
        elif k != last:
            transitions.append([k, t])
            last = k
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

    def __init__(self, x, geometry: dict, mode: str, interval_ms: float):
        config = dict(geometry, display=x.display, mode=mode, interval=interval_ms / 1000)
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
    sx0, sy0 = strip_origin(width)
    damage = [(0, 0, width, height)]
    times: list[float] = []
    spent: list[float] = []

    class Producer(Paced):
        def draw(self, k: int) -> None:
            t = time.monotonic()
            frame = bases[k % len(bases)].copy()
            paint_code(frame, k, sx0, sy0)
            times.append(time.monotonic())
            server.display.update(frame, damage)
            spent.append(time.monotonic() - t)

    still = bases[0].copy()
    paint_code(still, 0, sx0, sy0)
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
            geometry = strip_geometry(mapping, width)
            capturer = Capturer(x, geometry, mode, interval_ms)
            with producer:
                if streaming == "all":
                    xclient.wait_until(lambda: active_stream(server, fps), 20, 0.1, "a stream with frames")
                time.sleep(0.5)
                t0 = time.monotonic()
                capturer.go(t0 + seconds + 1.0)
                time.sleep(seconds)
                stats = server.stats()
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
    return summarise(codec, width, height, fps, seconds, mode, t0, times, spent, seen, stats, mapping,
                     window_geometry, warnings.messages, client_lines)


def active_stream(server, min_frames: int = 0):
    clients = server.stats()["clients"]
    active = clients[0].get("streams", {}).get("active") if clients else None
    return active if active and active["frames_sent"] > min_frames else None


def summarise(codec, width, height, fps, seconds, mode, t0, times, spent, seen, stats, mapping,
              window_geometry, warnings, client_lines) -> dict:
    first: dict[int, float] = {}
    impossible = out_of_order = 0
    highest = -1
    for v, t in seen["transitions"]:
        before = bisect.bisect_right(times, t)  # frames 0 .. before-1 were updated by then
        if before - 1 < v:
            impossible += 1  # a number not yet drawn: a misread that passed the check
            continue
        k = v + MODULUS * ((before - 1 - v) // MODULUS)
        if k < highest:
            out_of_order += 1
        highest = max(highest, k)
        first.setdefault(k, t)
    window = [k for k, t in enumerate(times) if t0 + 1.0 <= t < t0 + seconds]
    shown = [k for k in window if k in first]
    latency = np.array([(first[k] - times[k]) * 1000 for k in shown]) if shown else np.zeros(1)
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
        "never_shown_runs": {"count": len(gaps), "longest": max(gaps, default=0)},
        "out_of_order_sightings": out_of_order, "misreads": impossible,
        "capture": {"mode": mode, "grabs": seen["grabs"],
                    "grabs_per_s": round(seen["grabs"] / max(seen["elapsed"], 1e-9)),
                    "grab_ms_mean": round(seen["grab_time"] / max(1, seen["grabs"]) * 1000, 3),
                    "unreadable_grabs": seen["unreadable"],
                    "cpu_share": round(seen["cpu"] / max(seen["elapsed"], 1e-9), 2)},
        "screen": {"scale": [round(sx, 3), round(sy, 3)], "origin": [round(ox, 1), round(oy, 1)],
                   "window": list(window_geometry)},
        "producer_update_ms": {"p50": pct(np.array(spent) * 1000, 50), "p95": pct(np.array(spent) * 1000, 95)},
        "server": {"bytes_sent": client.get("bytes_sent"), "stream": streams.get("active"),
                   "ended_streams": len(streams.get("ended", [])), "failed_codecs": streams.get("failed_codecs")},
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
        for codec, width, height, fps in cases:
            try:
                row = run_case(codec, width, height, fps, args.seconds, args.capture, args.grab_interval_ms,
                               log_dir)
            except Exception as exc:  # one case failing (a missing decoder, a timeout) is a result too
                row = {"codec": codec, "size": f"{width}x{height}", "fps": fps,
                       "error": f"{type(exc).__name__}: {exc}"}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                continue
            results.append(row)
            print(json.dumps({k: row[k] for k in ("codec", "size", "fps", "shown_share", "latency_ms")}
                             | {"grabs_per_s": row["capture"]["grabs_per_s"]}), file=sys.stderr, flush=True)
    print(json.dumps({"metric": "display.update -> first sighting of the frame on remote-viewer's screen "
                                "(Xvfb framebuffer), ms",
                      "capture": args.capture, "cores": os.cpu_count(), "results": results},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
