"""The agent with real clients: remote-viewer (spice-gtk) under Xvfb for the clipboard and
window resizes (xclip and xdotool on the client's display), spice-gtk's own library for file
transfer (what remote-viewer runs when a file is dropped on it)."""

from __future__ import annotations

import io
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spicestream

try:
    from . import xclient
except ImportError:
    import xclient

_missing = xclient.missing_tools(xclient.REQUIRED_TOOLS + ("xclip",))
if _missing:
    pytest.skip(f"needs {', '.join(_missing)} (remote-viewer under Xvfb)", allow_module_level=True)

pytestmark = [pytest.mark.realclient, pytest.mark.timeout(120)]

W, H = 640, 480
WAIT_S = 20.0  # for anything a client does in well under a second here
FILES_SCRIPT = Path(__file__).with_name("spice_gtk_files.py")


def grey(width: int, height: int, level: int = 80) -> np.ndarray:
    frame = np.full((height, width, 4), level, np.uint8)
    frame[..., 3] = 255
    return frame


def next_item(q: queue.Queue, what: str, timeout: float = WAIT_S):
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no {what} within {timeout:.0f} s") from None


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def pixels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture
def viewer(tmp_path):
    """A server with a grey picture, remote-viewer showing it, and the agent's capabilities
    exchanged (the point from which spice-gtk syncs clipboards)."""
    server = spicestream.Server(port=0, width=W, height=H).start()
    server.display.update(grey(W, H))
    clipboard, sizes = queue.Queue(), queue.Queue()
    server.on_clipboard = lambda mime, data, selection: clipboard.put((mime, data, selection))
    server.on_resize = lambda width, height: sizes.put((width, height))
    try:
        with xclient.XSession(1280, 1024, log_dir=tmp_path / "logs") as x:
            proc = x.start_viewer(f"spice://127.0.0.1:{server.port}")
            window = x.find_window(proc)
            xclient.wait_until(lambda: agent_ready(server), WAIT_S, 0.1, "the agent's capabilities")
            # remote-viewer sizes its window to the picture once it shows: a window resized
            # before that would be sized back.
            xclient.wait_until(lambda: settled(x, window), WAIT_S, 0.25, "the viewer's window settling")
            yield server, x, window, clipboard, sizes
    finally:
        server.stop()


def settled(x, window) -> bool:
    geometries = []
    for _ in range(3):
        geometries.append(x.geometry(window))
        time.sleep(0.25)
    return len(set(geometries)) == 1


def agent_ready(server) -> bool:
    agents = list(server._on_loop(lambda: list(server._core.agents())))
    return bool(agents) and all(a.client_caps for a in agents)


def xclip_in(x, data: bytes, selection: str = "clipboard", target: str | None = None) -> None:
    # xclip forks a child that owns the selection until another owner takes it.
    args = ["xclip", "-selection", selection, "-i"] + (["-t", target] if target else [])
    subprocess.run(args, input=data, env=x.env, timeout=10, check=True)


def xclip_out(x, selection: str = "clipboard", target: str | None = None) -> bytes:
    args = ["xclip", "-selection", selection, "-o"] + (["-t", target] if target else [])
    result = subprocess.run(args, env=x.env, capture_output=True, timeout=10)
    return result.stdout if result.returncode == 0 else b""


def test_text_copied_on_the_client_reaches_the_application_and_back(viewer):
    server, x, window, clipboard, _ = viewer
    text = "copied in the viewer: grüße ✓"
    xclip_in(x, text.encode())
    assert next_item(clipboard, "clipboard text") == ("text/plain;charset=utf-8", text.encode(), "clipboard")
    xclip_in(x, b"the primary selection", "primary")
    assert next_item(clipboard, "primary text") == ("text/plain;charset=utf-8", b"the primary selection", "primary")
    # The application's copy: the client's X clipboard serves it to any program there.
    server.set_clipboard("from the application ✓")
    xclient.wait_until(lambda: xclip_out(x) == "from the application ✓".encode(), WAIT_S, 0.2,
                       "the application's text on the client's clipboard")
    server.set_clipboard("primary from the application", selection="primary")
    xclient.wait_until(lambda: xclip_out(x, "primary") == b"primary from the application", WAIT_S, 0.2,
                       "the application's primary selection on the client")


def test_png_images_cross_both_ways(viewer):
    server, x, window, clipboard, _ = viewer
    rng = np.random.default_rng(7)
    theirs = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    xclip_in(x, png_bytes(theirs), target="image/png")
    mime, data, selection = next_item(clipboard, "the client's image")
    assert (mime, selection) == ("image/png", "clipboard")
    assert (pixels_of(data) == theirs).all()
    ours = rng.integers(0, 256, (29, 61, 3), dtype=np.uint8)
    server.set_clipboard(png_bytes(ours), "image/png")

    def pasted():
        data = xclip_out(x, target="image/png")
        return data.startswith(b"\x89PNG") and pixels_of(data).shape == ours.shape and data
    data = xclient.wait_until(pasted, WAIT_S, 0.2, "the application's image on the client")
    assert (pixels_of(data) == ours).all()


def test_window_resize_reaches_on_resize_and_the_picture_follows(viewer):
    server, x, window, _, sizes = viewer
    while not sizes.empty():  # what the viewer asked at start, if anything
        sizes.get()
    # Should the viewer still size its window back, the size is asked again until it asks.
    request = None
    for _ in range(4):
        x.run("xdotool", "windowsize", str(window), "900", "700")
        try:
            request = sizes.get(timeout=WAIT_S / 4)
            break
        except queue.Empty:
            pass
    assert request is not None, f"no resize request; the window is {x.geometry(window)}"
    width, height = request
    # The viewer asks for its display area: the 900x700 window less its menu and tool bars.
    assert 900 - 40 <= width <= 900 and 700 - 200 <= height < 700, (width, height)
    # The application follows: a picture of exactly that size, with a 100x100 green square
    # and a blue bottom-right corner, shown 1:1 if the viewer's display area fits it.
    frame = grey(width, height)
    frame[50:150, 50:150, :3] = (0, 255, 0)
    frame[height - 60:, width - 60:, :3] = (255, 0, 0)
    server.display.resize(width, height)
    server.display.update(frame)

    def shown():
        shot = x.screenshot().astype(np.int16)
        green = np.argwhere((abs(shot - (0, 255, 0)) < 16).all(axis=2))
        blue = np.argwhere((abs(shot - (0, 0, 255)) < 16).all(axis=2))
        if len(green) < 5000 or len(blue) < 1000:
            return None
        g_h, g_w = green.max(axis=0) - green.min(axis=0) + 1
        span = blue.max(axis=0) - green.min(axis=0) + 1 + 50  # green starts 50 px in
        return (int(g_w), int(g_h)), (int(span[1]), int(span[0]))
    square, picture = xclient.wait_until(shown, WAIT_S, 0.3, "the resized picture")
    assert abs(square[0] - 100) <= 2 and abs(square[1] - 100) <= 2, square  # 1:1, not scaled
    assert abs(picture[0] - width) <= 2 and abs(picture[1] - height) <= 2, (picture, width, height)


def run_files(port: int, *paths) -> dict:
    result = subprocess.run([sys.executable, str(FILES_SCRIPT), f"spice://127.0.0.1:{port}", *map(str, paths)],
                            capture_output=True, text=True, timeout=90)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    assert lines, f"spice_gtk_files.py printed nothing: {result.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_files_sent_by_spice_gtk_land_whole_and_refusals_are_explained(tmp_path):
    pytest.importorskip("gi")
    probe = subprocess.run([sys.executable, "-c", "import gi; gi.require_version('SpiceClientGLib', '2.0')"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs gir1.2-spiceclientglib-2.0 (spice-gtk's library from PyGObject)")
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    payload = os.urandom(300_000)  # 5 of spice-gtk's 64 KiB pieces, 147 AGENT_DATA messages
    (outbox / "report.bin").write_bytes(payload)
    (outbox / "huge.bin").write_bytes(b"\0" * 600_000)
    (inbox / "report.bin").write_bytes(b"an older file of that name")
    landed = queue.Queue()
    server = spicestream.Server(port=0, width=64, height=64, file_transfer_dir=str(inbox),
                                max_file_size=400_000).start()
    server.on_file = lambda name, path: landed.put((name, path))
    server.display.update(grey(64, 64))
    try:
        assert run_files(server.port, outbox / "report.bin") == {"ok": True, "error": None, "agent_caps_seen": True,
                                                                 "file_errors": []}
        name, path = next_item(landed, "on_file")
        assert name == "report (1).bin" and Path(path) == inbox / name
        assert (inbox / name).read_bytes() == payload
        assert (inbox / "report.bin").read_bytes() == b"an older file of that name"
        refused = run_files(server.port, outbox / "huge.bin")
        # spice-gtk words our detailed refusal for its user: not enough space, and how much.
        assert refused["ok"] is False and len(refused["file_errors"]) == 1, refused
        assert "space" in refused["file_errors"][0].lower(), refused
    finally:
        server.stop()
    assert sorted(p.name for p in inbox.iterdir()) == ["report (1).bin", "report.bin"]  # nothing partial
    assert landed.empty()
    shutil.rmtree(outbox)
