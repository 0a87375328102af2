"""`spicestream run -- COMMAND`: a private X server, COMMAND on it, served until it ends; every
way out leaves no X server, no lock file and no socket behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spicestream.protocol.agent import MON_CONFIG, AgentMsg
from spicestream.testing.client import TestClient

try:
    from . import xclient
    from .helpers import X_SERVER_CHURNING_TUNABLES
except ImportError:
    import xclient
    from helpers import X_SERVER_CHURNING_TUNABLES

pytestmark = [pytest.mark.skipif(bool(xclient.missing_tools(("Xvfb", "xdpyinfo"))), reason="needs Xvfb"),
              pytest.mark.timeout(120)]
SERVING = re.compile(r"serving .* on (:\d+) on spice://127\.0\.0\.1:(\d+)")
GTK_AGENT_CAPS = {1, 2, 5, 6, 12, 14, 16, 17}


def x_servers(parent: int) -> set[int]:
    """PIDs of the Xvfb and Xorg processes `parent` started (other tests run their own)."""
    out = subprocess.run(["pgrep", "-P", str(parent), "-x", "Xvfb|Xorg"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class Run:
    """`spicestream run` in a subprocess; `.display` and `.port` once it serves."""

    def __init__(self, *args: str, env=None):
        self.started_x: set[int] = set()
        self.proc = subprocess.Popen([sys.executable, "-m", "spicestream", "run", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.display = self.port = None

    def wait_serving(self, timeout: float = 30) -> "Run":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            match = SERVING.search(line or "")
            if match:
                self.display, self.port = match.group(1), int(match.group(2))
                self.started_x = x_servers(self.proc.pid)
                return self
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"run did not serve: {self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def ours(self) -> set[int]:
        """The X servers this run started that are still running."""
        return {pid for pid in self.started_x | (x_servers(self.proc.pid) if self.proc.poll() is None else set())
                if running(pid)}

    def finish(self, timeout: float = 20) -> int:
        code = self.proc.wait(timeout)
        self.stderr = self.proc.stderr.read()
        return code

    def assert_clean(self) -> None:
        deadline = time.monotonic() + 5
        while self.ours() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.ours(), f"X servers left: {self.ours()}"
        if self.display:
            n = self.display[1:]
            assert not os.path.exists(f"/tmp/.X{n}-lock") and not os.path.exists(f"/tmp/.X11-unix/X{n}"), n


def test_typing_reaches_the_xterm_and_exit_ends_the_session_with_status_0(tmp_path):
    if xclient.missing_tools():
        pytest.skip("needs remote-viewer under Xvfb")
    out = tmp_path / "typed.txt"
    script = f'read line; echo "$line" > {out}; read cmd; [ "$cmd" = exit ] && exit 0; exit 3'
    run = Run("--", "xterm", "-geometry", "160x50+0+0", "-e", "sh", "-c", script).wait_serving()
    try:
        with xclient.XSession(1600, 1000, log_dir=tmp_path / "client") as x:
            viewer = x.start_viewer(f"spice://127.0.0.1:{run.port}")
            window = x.find_window(viewer)
            time.sleep(1.5)  # the display and inputs channels come up
            gx, gy, gw, gh = x.geometry(window)
            x.move(gx + gw // 3, gy + gh // 3)  # the pointer over the xterm (no window manager)
            x.focus(window)
            x.type("hello spice")
            x.key("Return")
            text = xclient.wait_until(lambda: out.exists() and out.read_text().strip(), 15, 0.2, "the typed line")
            assert text == "hello spice"
            x.type("exit")
            x.key("Return")
            assert run.finish() == 0
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    run.assert_clean()


def test_command_status_crash_and_signals_leave_nothing_running(tmp_path):
    # COMMAND's status is ours; a crash is 128+signal.
    for script, status in (("exit 7", 7), ("kill -SEGV $$", 128 + signal.SIGSEGV)):
        run = Run("--", "sh", "-c", script).wait_serving()
        assert run.finish() == status
        run.assert_clean()
    # SIGTERM and SIGINT: COMMAND is stopped too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        marker = tmp_path / f"alive-{sig}"
        run = Run("--", "sh", "-c", f"touch {marker}; sleep 60").wait_serving()
        xclient.wait_until(marker.exists, 10, 0.1, "the command")
        sleepers = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True, text=True).stdout.split()
        run.proc.send_signal(sig)
        assert run.finish() == 128 + sig
        run.assert_clean()
        for pid in sleepers:
            assert not Path(f"/proc/{pid}").exists(), "the command outlived the session"


def test_a_session_killed_outright_takes_its_x_server_and_command_with_it(tmp_path):
    """SIGKILL leaves no chance to clean up: the children get SIGTERM from the kernel
    (PR_SET_PDEATHSIG, set by setpriv before each execs)."""
    marker = tmp_path / "alive"
    run = Run("--", "sh", "-c", f"touch {marker}; sleep 60").wait_serving()
    xclient.wait_until(marker.exists, 10, 0.1, "the command")
    (x_pid,) = run.ours()
    commands = [int(p) for p in subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True,
                                                text=True).stdout.split()]
    assert commands
    run.proc.kill()
    run.proc.wait(10)
    deadline = time.monotonic() + 10
    while (running(x_pid) or any(running(p) for p in commands)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(x_pid), "the X server outlived the session"
    assert not [p for p in commands if running(p)], "the command outlived the session"


def test_an_x_server_killed_under_the_session_ends_it_and_is_cleaned_up():
    run = Run("--", "sleep", "60").wait_serving()
    (x_pid,) = run.ours()
    os.kill(x_pid, signal.SIGKILL)  # leaves its lock file and socket behind
    assert run.finish() == 1
    assert "X server has exited" in run.stderr
    run.assert_clean()


def test_exit_on_disconnect_and_keep_alive():
    run = Run("--exit-on-disconnect", "--", "sleep", "60").wait_serving()
    with TestClient("127.0.0.1", run.port, channels=()) as client:
        client.wait_for(lambda c: c.session_id, what="the session")
    assert run.finish() == 0
    run.assert_clean()
    run = Run("--keep-alive", "--", "true").wait_serving()
    time.sleep(1.0)  # COMMAND has long ended
    with TestClient("127.0.0.1", run.port, channels=()) as client:  # still served
        client.wait_for(lambda c: c.session_id, what="the session")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0  # `true`'s status
    run.assert_clean()


def test_bad_input_gives_a_clear_message_and_leaves_nothing(tmp_path):
    for args, code, words in ((["--"], 2, "command to run is missing"),
                              (["--", "no-such-command-here"], 2, "does not exist"),
                              (["--source", "x11", "--", "true"], 2, "--source")):
        run = Run(*args)
        assert run.finish() == code
        assert words in run.stderr, run.stderr
        run.assert_clean()
    # An X server that fails to start: a fake Xvfb first on PATH.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "Xvfb").write_text("#!/bin/sh\necho 'fatal: no screens' >&2\nexit 1\n")
    (fake / "Xvfb").chmod(0o755)
    run = Run("--", "true", env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"))
    assert run.finish() == 1
    assert "did not start" in run.stderr and "no screens" in run.stderr, run.stderr
    run.assert_clean()


def test_xorg_dummy_session_follows_the_client_size(tmp_path):
    if subprocess.run(["which", "Xorg"], capture_output=True).returncode != 0:
        pytest.skip("needs Xorg (xserver-xorg-core) and xserver-xorg-video-dummy")
    run = Run("--x-server", "xorg", "--size", "1024x768", "--", "sleep", "60").wait_serving()
    try:
        x = xclient.XSession()
        x.env = dict(os.environ, DISPLAY=run.display)
        assert x.screen_size() == (1024, 768)
        with TestClient("127.0.0.1", run.port, channels=(), agent_caps=GTK_AGENT_CAPS) as client:
            client.wait_for(lambda c: c.agent_server_caps is not None, what="the agent")
            monitors = MON_CONFIG.pack(MON_CONFIG.type(900, 1400, 32, 0, 0))
            client.agent_send(AgentMsg.MONITORS_CONFIG, num_of_monitors=1, flags=0, monitors=monitors)
            xclient.wait_until(lambda: x.screen_size() == (1400, 900), 15, 0.2, "the X screen at 1400x900")
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 128 + signal.SIGTERM
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    run.assert_clean()


def _faults_per_put_image(display: str, pid: int, width: int, height: int, count: int = 20) -> float:
    """Minor page faults the X server takes per PutImage of a width x height window (after three
    to warm up), each followed by a round trip so that the server has read and drawn it."""
    from helpers import WindowImages

    from spicestream.sources.xpages import minor_faults

    images = WindowImages(display, width, height)
    image = bytes(range(256)) * (width * height * 4 // 256)
    try:
        images.round_trip()
        for _ in range(3):
            images.put(image)
            images.round_trip()
        before = minor_faults(pid)
        for _ in range(count):
            images.put(image)
            images.round_trip()
        return (minor_faults(pid) - before) / count
    finally:
        images.close()


@pytest.mark.parametrize("kind", ["xvfb", "xorg"])
def test_the_session_x_server_takes_large_requests_without_fresh_pages(tmp_path, kind, monkeypatch):
    """The X server a session starts reads each whole-window PutImage into the heap it already
    has. Started the default way, glibc hands it fresh pages for every such request (see
    X_SERVER_MALLOC_TUNABLES): the control run shows that the count sees those faults (its
    threshold pinned where glibc starts it, so that it churns every time)."""
    from spicestream.session import PrivateXServer

    if kind == "xorg" and subprocess.run(["which", "Xorg"], capture_output=True).returncode != 0:
        pytest.skip("needs Xorg (xserver-xorg-core) and xserver-xorg-video-dummy")
    wrap = Path("/usr/lib/xorg/Xorg.wrap")  # xserver-xorg-legacy: setuid, and glibc then
    if kind == "xorg" and wrap.exists() and wrap.stat().st_mode & 0o4000:  # ignores GLIBC_TUNABLES
        pytest.skip("Xorg runs through the setuid Xorg.wrap here, which drops GLIBC_TUNABLES")
    width, height = 640, 360
    pages = width * height * 4 // 4096  # 225 pages a request

    def faults() -> float:
        server = PrivateXServer(kind, (width, height), tmp_path).start()
        try:
            return _faults_per_put_image(server.display, server.proc.pid, width, height)
        finally:
            server.stop()

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    ours = faults()
    monkeypatch.setattr(PrivateXServer, "environment",
                        staticmethod(lambda: dict(os.environ, GLIBC_TUNABLES=X_SERVER_CHURNING_TUNABLES)))
    default = faults()
    assert default >= pages / 2, (default, pages)  # the control: fresh pages for every request
    assert ours <= pages / 10, (ours, default, pages)


def test_the_x_server_environment_adds_the_malloc_thresholds_to_a_users_tunables(monkeypatch):
    from spicestream.session import PrivateXServer
    from spicestream.sources.xpages import X_SERVER_MALLOC_TUNABLES

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert PrivateXServer.environment()["GLIBC_TUNABLES"] == X_SERVER_MALLOC_TUNABLES
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert PrivateXServer.environment()["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F:" + X_SERVER_MALLOC_TUNABLES
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")  # theirs wins
    assert PrivateXServer.environment()["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=65536"
