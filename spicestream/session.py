"""`spicestream run -- COMMAND`: a private X server (Xvfb, or Xorg with the dummy driver), with
COMMAND running on it, served until COMMAND ends; and, with --audio, a private PulseAudio.

Everything started here is stopped on every way out (COMMAND ends, SIGTERM, SIGINT, the X
server dying, an error) and dies with us even if we are killed (PR_SET_PDEATHSIG): an X server
gets SIGTERM (it removes its own lock file and socket), and if it had to be killed, its lock
file and socket are removed here.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .sources.xpages import X_SERVER_MALLOC_TUNABLES

log = logging.getLogger("spicestream.session")

X_SERVERS = ("xvfb", "xorg")
START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
FIRST_DISPLAY = 20

XORG_DUMMY_CONF = """\
Section "ServerFlags"
    Option "AutoAddDevices" "false"
    Option "DontVTSwitch" "true"
EndSection
Section "Device"
    Identifier "dummy"
    Driver "dummy"
    VideoRam 262144
EndSection
Section "Monitor"
    Identifier "monitor"
    HorizSync 5.0-1000.0
    VertRefresh 5.0-200.0
EndSection
Section "Screen"
    Identifier "screen"
    Device "dummy"
    Monitor "monitor"
    DefaultDepth 24
    SubSection "Display"
        Depth 24
        Virtual 7680 4320
    EndSubSection
EndSection
"""


class SessionError(RuntimeError):
    """The session cannot start (no X server, a command that does not exist...)."""


def _dying_with_us(command: list[str]) -> list[str]:
    """`command`, run so that it gets SIGTERM if we die, however we die (PR_SET_PDEATHSIG,
    set by util-linux's setpriv before it execs the command). Popen's `preexec_fn` could set it
    too, but that runs Python in the child of a threaded process (the server's and GStreamer's
    threads), where a lock another thread held at fork time can deadlock it. Popen's
    `start_new_session` gives the child its own process group: a Ctrl-C in our terminal is
    ours to pass on."""
    if shutil.which("setpriv") is None:  # util-linux is essential on Debian; elsewhere, say so
        log.warning("setpriv (util-linux) is missing: %s will outlive us if we are killed", command[0])
        return list(command)
    return ["setpriv", "--pdeathsig", "TERM", "--", *command]


def stop_process(proc: subprocess.Popen | None, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process's group (what it started too, even if it has already exited
    itself), then SIGKILL what is left after `grace`; reap it."""
    if proc is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nobody left in the group
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # The leader is gone; give the rest of its group the same grace, then kill it.
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(proc.pid):
                time.sleep(0.05)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class PrivateXServer:
    """An X server of our own on a free display number, ready when `start()` returns."""

    def __init__(self, kind: str, size: tuple[int, int], workdir: Path):
        if kind not in X_SERVERS:
            raise SessionError(f"unknown X server {kind!r}: {' or '.join(X_SERVERS)}")
        self.kind, self.size, self.workdir = kind, size, workdir
        self.proc: subprocess.Popen | None = None
        self.number: int | None = None

    @property
    def display(self) -> str:
        return f":{self.number}"

    def _command(self, displayfd: int) -> list[str]:
        w, h = self.size
        if self.kind == "xvfb":
            return ["Xvfb", "-displayfd", str(displayfd), "-screen", "0", f"{w}x{h}x24",
                    "-nolisten", "tcp", "-noreset"]
        conf = self.workdir / "xorg.conf"
        conf.write_text(XORG_DUMMY_CONF)
        return ["Xorg", "-displayfd", str(displayfd), "-config", str(conf), "-logfile",
                str(self.workdir / "xorg.log"), "-nolisten", "tcp", "-noreset", "-novtswitch", "-sharevts"]

    @staticmethod
    def environment() -> dict[str, str]:
        """Ours, with X_SERVER_MALLOC_TUNABLES added to any GLIBC_TUNABLES the user has (their
        own malloc thresholds, if they set any, win)."""
        env = dict(os.environ)
        theirs = env.get("GLIBC_TUNABLES", "")
        if "glibc.malloc.mmap_threshold" not in theirs and "glibc.malloc.trim_threshold" not in theirs:
            env["GLIBC_TUNABLES"] = ":".join(t for t in (theirs, X_SERVER_MALLOC_TUNABLES) if t)
        return env

    def start(self) -> "PrivateXServer":
        binary = "Xvfb" if self.kind == "xvfb" else "Xorg"
        if shutil.which(binary) is None:
            raise SessionError(f"{binary} is not installed (Debian: "
                               f"{'xvfb' if self.kind == 'xvfb' else 'xserver-xorg-core xserver-xorg-video-dummy'})")
        read_fd, write_fd = os.pipe()
        log_file = open(self.workdir / f"{self.kind}.log", "ab")
        try:
            self.proc = subprocess.Popen(_dying_with_us(self._command(write_fd)), pass_fds=(write_fd,),
                                         env=self.environment(), stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
            log_file.close()
        try:
            number = self._read_number(read_fd)
        finally:
            os.close(read_fd)
        if number is None:
            stop_process(self.proc)
            tail = (self.workdir / f"{self.kind}.log").read_text(errors="replace")[-600:]
            raise SessionError(f"{binary} did not start: {tail.strip() or 'no output'}")
        self.number = number
        try:  # which socket is ours, should we have to remove it (stop)
            self._socket_inode = os.stat(f"/tmp/.X11-unix/X{number}").st_ino
        except OSError:
            self._socket_inode = None
        if self.kind == "xorg":
            self._set_size()
        log.info("%s on %s (%dx%d)", binary, self.display, *self.size)
        return self

    def _read_number(self, fd: int) -> int | None:
        # -displayfd: the server writes its display number and a newline once it accepts
        # connections (it picks a free number itself).
        data, deadline = b"", time.monotonic() + START_TIMEOUT_S
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, 64)
            if not chunk:
                return None
            data += chunk
        try:
            return int(data.strip())
        except ValueError:
            return None

    def _set_size(self) -> None:
        from .sources.x11randr import X11Resizer

        # Kept open while the server runs: a mode made by an X client goes with its connection.
        self._resizer = X11Resizer(self.display)
        if not self._resizer.resize(*self.size):
            raise SessionError(f"Xorg did not take the size {self.size[0]}x{self.size[1]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        resizer = getattr(self, "_resizer", None)
        if resizer is not None:
            try:
                resizer.close()
            except Exception:  # the server is already gone
                pass
            self._resizer = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc)
        if self.number is not None and proc.returncode == -signal.SIGKILL:
            # A killed server leaves its socket (and lock file, if it made one) behind. Only
            # ours are removed: another server may have taken the display number since.
            lock, sock = Path(f"/tmp/.X{self.number}-lock"), Path(f"/tmp/.X11-unix/X{self.number}")
            try:
                lock_ours = int(lock.read_text().strip() or 0) == proc.pid
            except FileNotFoundError:
                lock_ours = None  # none to remove (-displayfd servers make none here)
            except (OSError, ValueError):
                lock_ours = False
            try:
                sock_ours = self._socket_inode is not None and os.stat(sock).st_ino == self._socket_inode
            except OSError:
                sock_ours = False
            for path, ours in ((lock, lock_ours), (sock, sock_ours and lock_ours is not False)):
                if ours:
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        log.warning("could not remove %s: %s", path, exc)


class PrivatePulse:
    """A PulseAudio server of our own with a null sink; its monitor is the desktop's sound."""

    def __init__(self, workdir: Path, sink: str = "desktop"):
        self.dir = Path(workdir) / "pulse"
        self.socket = self.dir / "native"
        self.sink = sink
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> "PrivatePulse":
        if shutil.which("pulseaudio") is None:
            raise SessionError("--audio needs pulseaudio (Debian: pulseaudio)")
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HOME=str(self.dir / "home"), XDG_RUNTIME_DIR=str(self.dir),
                   PULSE_RUNTIME_PATH=str(self.dir))
        env.pop("PULSE_SERVER", None)
        log_file = open(self.dir / "pulseaudio.log", "ab")
        self.proc = subprocess.Popen(
            _dying_with_us(["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
                            f"--load=module-native-protocol-unix socket={self.socket} auth-anonymous=1",
                            f"--load=module-null-sink sink_name={self.sink} rate=48000 channels=2",
                            "--load=module-always-sink"]),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=log_file, start_new_session=True)
        log_file.close()  # the child has its own
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SessionError(f"pulseaudio did not start (see {self.dir}/pulseaudio.log)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class Session:
    """The X server, the optional PulseAudio, and COMMAND; `close()` stops them all."""

    def __init__(self, command: list[str], x_server: str, size: tuple[int, int], audio: bool):
        if not command:
            raise SessionError("no command to run: spicestream run [options] -- COMMAND [ARGS...]")
        if shutil.which(command[0]) is None:
            raise SessionError(f"command not found: {command[0]}")
        self.command = command
        self.workdir = Path(tempfile.mkdtemp(prefix="spicestream-run-"))
        self.x = PrivateXServer(x_server, size, self.workdir)
        self.pulse = PrivatePulse(self.workdir) if audio else None
        self.child: subprocess.Popen | None = None

    def start(self) -> "Session":
        try:
            self.x.start()
            if self.pulse is not None:
                self.pulse.start()
        except BaseException:
            self.close()
            raise
        return self

    def env(self) -> dict:
        env = dict(os.environ, DISPLAY=self.x.display)
        env.pop("WAYLAND_DISPLAY", None)
        if self.pulse is not None:
            env["PULSE_SERVER"] = self.pulse.address
        return env

    def run_command(self) -> None:
        self.child = subprocess.Popen(_dying_with_us(self.command), env=self.env(), stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        log.info("running %s (pid %d) on %s", " ".join(self.command), self.child.pid, self.x.display)

    def command_status(self) -> int | None:
        """COMMAND's exit status once it has ended (128+N for signal N), else None."""
        if self.child is None:
            return None
        code = self.child.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    def close(self) -> None:
        stop_process(self.child)
        if self.pulse is not None:
            self.pulse.stop()
        self.x.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
