"""`spicestream.Server`: the application's handle on a SPICE server.

    server = spicestream.Server(host="127.0.0.1", port=5900, password=None)
    server.display.update(frame)          # from any thread
    server.on_key = lambda scancode, pressed: ...
    server.start(); ...; server.stop()    # or: await server.serve()

Callbacks run on the server's event-loop thread; keep them short.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import threading
import time

import numpy as np

from ..display.streams import MODES
from ..display.surface import Display
from ..threadname import name_this_thread
from ..video.codec_list import DEFAULT_CODECS
from ..video.factory import VideoCodecs
from .connection import ChannelConnection
from .agent import MIME_PNG, MIME_TEXT, SELECTION_NAMES, TYPE_OF, ClipboardError
from .core import DEFAULT_MAX_CLIPBOARD, ServerCore
from .filexfer import FileTransferConfig
from .cursor import cursor_bytes
from .security import is_loopback, parse_secure_channels, tls_context
from .ticks import TICK_IDLE_S, TickSchedule
from .web import WebRoot, normalise_origin

log = logging.getLogger("spicestream.server")
STATS_LOG_S = 5.0


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """A listening unix socket at `path` with permissions `mode` from the start: it is bound
    under a random name, chmod-ed, then renamed into place, so that it is never reachable with
    the umask's permissions. A path where a server is still listening is refused (OSError); a
    stale socket from an earlier run is replaced."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale
        else:
            raise OSError(errno.EADDRINUSE, f"a server is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A short name beside it: unix socket paths are limited to ~107 bytes.
    temporary = os.path.join(os.path.dirname(path), f".{secrets.token_hex(4)}")
    try:
        sock.bind(temporary)
        os.chmod(temporary, mode)
        os.rename(temporary, path)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return sock


def _probe_done(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("probing encoders at start failed (%s); streams probe again when they start",
                    future.exception())


def _quiet_accept_errors(previous):
    """Out of fds (EMFILE/ENFILE), asyncio pauses the listener a second and reports it with a
    traceback every time: report it as one line per interval instead, and pass everything else
    to the handler that was there before."""
    last = [-1e9]

    def handler(loop, context):
        exc = context.get("exception")
        if (str(context.get("message", "")).startswith("socket.accept() out of system resource")
                and isinstance(exc, OSError)):
            now = time.monotonic()
            if now - last[0] >= 10.0:
                last[0] = now
                log.error("cannot accept connections: %s (new clients wait until fds are free)", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handler


class Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 5900, password: str | None = None,
                 *, name: str = "spicestream", width: int = 1024, height: int = 768,
                 video_codecs: str = DEFAULT_CODECS, streaming_video: str = "filter",
                 unix_path: str | None = None, max_clients: int = 8,
                 ticket_expiry: float | None = None, tls_port: int | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None,
                 secure_channels: str | list[str] = (), web: bool | str = False,
                 web_origins: list[str] = (), allow_unauthenticated_remote: bool = False,
                 unix_mode: int = 0o600, max_clipboard: int = DEFAULT_MAX_CLIPBOARD,
                 file_transfer_dir: str | None = None, max_file_size: int = 1 << 30):
        """`video_codecs`: "encoder:codec" entries separated by ";" (spice-server syntax),
        e.g. "gstreamer:h264;spice:mjpeg"; raises CodecListError for a bad list.
        `streaming_video`: "off", "all" or "filter" (spice-server's modes).
        `web`: serve spice-html5 and accept its WebSocket; `web_origins`: other pages that
        may open a WebSocket here ("https://portal.example"; ValueError for a bad one). With
        neither, browsers cannot connect at all. Listening beyond loopback without a password
        raises ValueError unless `allow_unauthenticated_remote` says it is meant.
        `max_clipboard`: the most bytes one clipboard content may have, either way.
        `file_transfer_dir`: where files dropped into a viewer go (None: refused);
        `max_file_size`: the largest such file."""
        if password is None and not is_loopback(host) and not allow_unauthenticated_remote:
            raise ValueError(f"refusing to serve {host} without a password: give one, or "
                             "allow_unauthenticated_remote=True if anyone who can reach it may")
        if password is not None and len(password.encode()) > 60:
            raise ValueError("password longer than 60 bytes: SPICE clients refuse it")
        if streaming_video not in MODES:
            raise ValueError(f"streaming_video must be one of {', '.join(MODES)}")
        self.host = host
        self.allow_unauthenticated_remote = allow_unauthenticated_remote
        self.port = port
        self.unix_path = unix_path  # also listen here (local clients; GL scanout fds)
        if unix_mode & ~0o660 or not unix_mode & 0o600 == 0o600:
            raise ValueError(f"unix_mode {unix_mode:o}: the owner reads and writes, a group may, others never")
        self.unix_mode = unix_mode  # 0600: only our user links without a password
        self.display = Display(width, height, streaming=streaming_video)
        codecs = None if streaming_video == "off" else VideoCodecs(video_codecs)
        self._core = ServerCore(self.display, None if password is None else password.encode(), name,
                                codecs)
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        if max_clipboard < 1:
            raise ValueError("max_clipboard must be at least 1 byte")
        self._core.clipboard.max_bytes = self.max_clipboard = max_clipboard
        if file_transfer_dir is not None:
            if not os.path.isdir(file_transfer_dir) or not os.access(file_transfer_dir, os.W_OK | os.X_OK):
                raise ValueError(f"file_transfer_dir {file_transfer_dir!r} is not a folder we can write to")
            if max_file_size < 0:
                raise ValueError("max_file_size must not be negative")
            self._core.file_transfer = FileTransferConfig(os.path.abspath(file_transfer_dir), max_file_size)
        self._core.max_clients = max_clients
        if ticket_expiry is not None:
            self.set_ticket(password, ticket_expiry)
        self.tls_port = tls_port
        self._tls = None
        if tls_port is not None:
            self._tls = tls_context(tls_cert, tls_key, tls_ca)  # raises TLSConfigError
        self._core.secure_channels = parse_secure_channels(secure_channels)
        if web:  # True, or the folder spice-html5 is in; raises WebError if it is missing
            self._core.web = WebRoot() if web is True else WebRoot(web)
        if isinstance(web_origins, str):
            web_origins = [web_origins]
        self._core.web_origins = frozenset(normalise_origin(o) for o in web_origins)
        if self._core.secure_channels and tls_port is None:
            raise ValueError("secure channels need a TLS port")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._wake_pending = False
        self._wakes_held = False  # hold_wakes(): a source on the loop pumps when it is done
        self._cursor_serial = 1

    # Application callbacks live on the core, which is what the channels call.
    @property
    def on_key(self):
        return self._core.on_key

    @on_key.setter
    def on_key(self, callback) -> None:
        self._core.on_key = callback

    @property
    def on_pointer(self):
        return self._core.on_pointer

    @on_pointer.setter
    def on_pointer(self, callback) -> None:
        self._core.on_pointer = callback

    @property
    def audio(self):
        """What the application plays: `server.audio.write(samples, rate=48000, channels=None)`
        (int16 or float32, interleaved or (n, channels), mono or stereo, 44.1/48 kHz; any
        thread) and `server.audio.set_volume(0.0-1.0, muted=None)`."""
        return self._core.audio.output

    @property
    def on_audio_in(self):
        return self._core.on_audio_in

    @on_audio_in.setter
    def on_audio_in(self, callback) -> None:
        """(samples, rate, channels): a client's microphone, 10 ms at a time ((n, 2) int16 at
        48 kHz). Clients record only while this is set."""
        self._core.on_audio_in = callback
        self._call_on_loop(lambda: [c.sync() for c in list(self._core.record_channels)])

    @property
    def on_clipboard(self):
        return self._core.on_clipboard

    @on_clipboard.setter
    def on_clipboard(self, callback) -> None:
        """(mime, data, selection): a client copied something. `mime` is
        "text/plain;charset=utf-8" (data: UTF-8 bytes) or "image/png" (other image types
        clients send are converted); `selection` is "clipboard" or "primary"."""
        self._core.on_clipboard = callback

    @property
    def on_resize(self):
        return self._core.on_resize

    @on_resize.setter
    def on_resize(self, callback) -> None:
        """(width, height[, monitors]): a client's window (or monitors) asks for this size.
        Act on it with display.resize (or not: the display keeps its size). `monitors`, for
        a callback that takes it: the client's list of dicts (width, height, x, y, depth)."""
        self._core.on_resize = callback

    @property
    def on_file(self):
        return self._core.on_file

    @on_file.setter
    def on_file(self, callback) -> None:
        """(name, path): a file a client dropped has arrived whole in file_transfer_dir."""
        self._core.on_file = callback

    def set_clipboard(self, data: bytes | str | None, mime: str = MIME_TEXT,
                      selection: str = "clipboard") -> None:
        """Put `data` on the clients' clipboard (None: clear it). Any thread. `mime`:
        "text/plain;charset=utf-8" (str or UTF-8 bytes) or "image/png"; `selection`:
        "clipboard" or "primary". ClipboardError if the type is unknown or the data is over
        max_clipboard."""
        if selection not in SELECTION_NAMES:
            raise ClipboardError(f"selection {selection!r}: clipboard or primary")
        sel = SELECTION_NAMES[selection]
        if data is None:
            kind, data = None, b""
        else:
            if mime.replace(" ", "").lower() in ("text/plain;charset=utf-8", "text/plain", "utf8_string"):
                mime = MIME_TEXT
            if mime not in TYPE_OF:
                raise ClipboardError(f"clipboard type {mime!r}: {MIME_TEXT} or {MIME_PNG}")
            kind = TYPE_OF[mime]
            data = data.encode() if isinstance(data, str) else bytes(data)
            if kind == TYPE_OF[MIME_PNG] and not data.startswith(b"\x89PNG\r\n\x1a\n"):
                raise ClipboardError("image/png data that is not a PNG")
            if len(data) > self._core.clipboard.max_bytes:
                raise ClipboardError(f"{len(data)} bytes on the clipboard; the limit is "
                                     f"{self._core.clipboard.max_bytes} (max_clipboard)")
        self._call_on_loop(self._core.clipboard.set, sel, kind, data, None)

    def _call_on_loop(self, function, *args) -> None:
        loop = self._loop
        if loop is not None and loop.is_running() and threading.current_thread() is not self._loop_thread:
            loop.call_soon_threadsafe(function, *args)
        else:
            function(*args)

    @property
    def on_gl_draw_done(self):
        return self.display.on_gl_draw_done

    @on_gl_draw_done.setter
    def on_gl_draw_done(self, callback) -> None:
        """(cookie) -> None, exactly once per display.gl_draw, from a server thread."""
        self.display.on_gl_draw_done = callback

    def set_cursor(self, pixels, hot_x: int = 0, hot_y: int = 0) -> None:
        """Show this pointer shape in clients: (h, w, 4) uint8 BGRA, straight alpha. Any thread."""
        self._cursor_serial += 1
        data = cursor_bytes(np.asarray(pixels, np.uint8), int(hot_x), int(hot_y), self._cursor_serial)
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._core.set_cursor, data)
        else:
            self._core.cursor = data

    def set_ticket(self, password: str | None, expires_in: float | None = None) -> None:
        """Change the password clients must give (None: any client), optionally valid for
        `expires_in` seconds only. Clients already linked stay linked. Dropping the password
        on a server reachable beyond loopback needs `allow_unauthenticated_remote` (ValueError)."""
        if password is None and not is_loopback(self.host) and not self.allow_unauthenticated_remote:
            raise ValueError(f"refusing to serve {self.host} without a password: give one, or "
                             "allow_unauthenticated_remote=True if anyone who can reach it may")
        if password is not None and len(password.encode()) > 60:
            raise ValueError("password longer than 60 bytes: SPICE clients refuse it")
        self._core.tickets.set(None if password is None else password.encode(), expires_in)

    def clients(self) -> list[int]:
        """Session ids of the connected clients."""
        return list(self._core.sessions)

    def set_client_input(self, session_id: int, enabled: bool) -> None:
        """Let one client drive the display, or make it view-only."""
        self._core.sessions[session_id].input_enabled = bool(enabled)

    @property
    def sessions(self) -> int:
        return len(self._core.sessions)

    @property
    def sessions_started(self) -> int:
        """How many clients have connected since start (those gone included)."""
        return self._core.sessions_started

    # -- running --------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Listen and serve until `stop()` is called (from any thread)."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_accept_errors(loop.get_exception_handler()))
        self._loop = loop
        self._core.link_keys.start(loop)
        self._loop_thread = threading.current_thread()
        self._stopping = asyncio.Event()
        # The schedule exists before the first wake-up can run a pump (which consults it).
        self._last_stats_log = now = time.monotonic()
        self._ticks = TickSchedule(now)
        self._ticker = loop.call_later(TICK_IDLE_S, self._tick)
        self.display.wake = self._wake
        pump = self._core.audio
        pump.output.wake = lambda: loop.call_soon_threadsafe(pump.wake) if not loop.is_closed() else None
        pump.output.on_volume = lambda: self._call_on_loop(
            lambda: [c.send_volume() for c in list(pump.channels)])
        listener = await loop.create_server(lambda: ChannelConnection(self._core), self.host, self.port)
        self.port = listener.sockets[0].getsockname()[1]
        log.info("listening on %s:%d", self.host, self.port)
        listeners = [listener]
        if self._tls is not None:
            # Handshakes are not yet connections (nothing counts them against the caps): give
            # them 10 s rather than asyncio's 60.
            tls = await loop.create_server(lambda: ChannelConnection(self._core), self.host,
                                           self.tls_port, ssl=self._tls, ssl_handshake_timeout=10.0)
            self.tls_port = tls.sockets[0].getsockname()[1]
            listeners.append(tls)
            log.info("listening with TLS on %s:%d", self.host, self.tls_port)
        unix_inode = None
        if self.unix_path is not None:
            sock = bind_unix_socket(self.unix_path, self.unix_mode)
            unix_inode = os.stat(self.unix_path).st_ino
            listeners.append(await loop.create_unix_server(lambda: ChannelConnection(self._core), sock=sock))
            log.info("listening on unix:%s (mode %o)", self.unix_path, self.unix_mode)
        if self._core.video_codecs is not None:
            # Probe encoders now, off the loop, so the first stream does not wait for it.
            loop.run_in_executor(None, lambda: self._core.video_codecs.probe).add_done_callback(_probe_done)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            self._ticker.cancel()
            for each in listeners:
                each.close()
            self._core.disconnect_all("server stopping")
            for each in listeners:
                await each.wait_closed()
            if unix_inode is not None:
                with contextlib.suppress(OSError):  # only ours: never a later server's socket
                    if os.stat(self.unix_path).st_ino == unix_inode:
                        os.unlink(self.unix_path)
            self._core.link_keys.close()
            self.display.draws.flush()  # nothing will consume pending draws any more
            self.display.wake = lambda: None
            self._core.audio.reset()  # no timer of a dead loop; a restart starts streams anew
            self._loop = None

    def _tick(self) -> None:
        # A timer that re-arms itself, not a task sleeping in a loop: a timer handle instead
        # of a future, a timer and a task step.
        self._periodic(time.monotonic())

    def _periodic(self, now: float) -> None:
        self._ticker.cancel()  # the timer's own run, or one a display update made early
        try:
            self.display.tick(now)
            self._core.control_tick(now)
        except Exception:  # one bad connection must not stop ticks for everyone
            log.exception("periodic tick failed")
        finally:
            # Loop time and monotonic time are one clock (asyncio's time() is monotonic()).
            at = self._ticks.ran(now, self._core.frames_waiting(), self.display.draws.next_deadline())
            self._ticker = self._loop.call_at(at, self._tick)
        if now - self._last_stats_log >= STATS_LOG_S and log.isEnabledFor(logging.DEBUG):
            self._last_stats_log = now
            for client in self._collect_stats()["clients"]:
                log.debug("stats %s", client)

    def stats(self) -> dict:
        """Per display client: its stream's encoder and send statistics. Callable from any
        thread: the numbers are gathered on the server's loop, where they change."""
        return self._on_loop(self._collect_stats)

    def frame_timings(self) -> list[list[dict]]:
        """Per display client, its active stream's recent frames: stamp, capture (monotonic
        time of display.update), written (monotonic time handed to the socket), size, key."""
        return self._on_loop(lambda: [c.streams.recent_frames() if c.streams else []
                                      for c in self._core.display_channels])

    def _on_loop(self, gather):
        """Run `gather()` on the server's loop (at once when already there, or not running)."""
        loop = self._loop
        if loop is None or not loop.is_running() or threading.current_thread() is self._loop_thread:
            return gather()

        async def run():
            return gather()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(5)

    def _collect_stats(self) -> dict:
        core = self._core
        out = {"clients": [], "server": {
            "clients_connected": len(core.sessions), "sessions_started": core.sessions_started,
            "link_attempts": core.link_attempts, "link_refusals": dict(core.link_refusals),
            "encoder_fallbacks": dict(core.encoder_fallbacks),
            "gl_draws": {"completed": self.display.draws.completed, "late": self.display.draws.late,
                         "pending": self.display.draws.pending,
                         "latency_hist": self.display.draws.latency.snapshot()},
            "audio": {**core.audio.stats(), "clients": [c.stats() for c in core.audio.channels]},
            "agents": [{"peer": agent.peer, **agent.summary()} for agent in core.agents()]}}
        for channel in list(core.display_channels):
            entry = {"peer": channel.conn.peer, "bytes_sent": channel.bytes_sent}
            if channel.streams is not None:
                entry["streams"] = channel.streams.stats()
            out["clients"].append(entry)
        return out

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server thread's event loop while serving, else None. A source driven by a file
        descriptor runs there (the X11 source): its frames then reach the clients without a
        hand-off between threads."""
        return self._loop

    def _wake(self) -> None:
        # Called by Display from any thread; coalesce so a fast producer schedules one pump.
        loop = self._loop
        if loop is None or self._wake_pending:
            return
        self._wake_pending = True
        if threading.current_thread() is self._loop_thread:  # a source on the loop: no self-pipe
            if not self._wakes_held:
                loop.call_soon(self._pump)
            return  # else release_wakes() pumps
        try:
            loop.call_soon_threadsafe(self._pump)
        except RuntimeError:  # loop closed while stopping
            self._wake_pending = False

    def hold_wakes(self) -> None:
        """On the loop: a source about to publish from there (the X11 capture) has the pump
        run by release_wakes() when it is done, instead of on the loop's next turn; a turn
        of the loop costs more than a frame's damage handling."""
        self._wakes_held = True

    def release_wakes(self) -> None:
        """On the loop, after hold_wakes(): pump now what was published meanwhile."""
        self._wakes_held = False
        if self._wake_pending and self._loop is not None:
            self._pump()

    def _pump(self) -> None:
        self._wake_pending = False
        self._core.pump_displays()
        now = time.monotonic()
        if self._ticks.due_on_update(now) and not self._stopping.is_set():  # (its timer is cancelled then)
            self._periodic(now)

    def start(self) -> "Server":
        """Serve from a background thread; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run_thread, name="spicestream", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def _run_thread(self) -> None:
        name_this_thread("ss-server")
        try:
            asyncio.run(self.serve())
        except BaseException as exc:  # reported to start()'s caller
            self._start_error = exc
            self._ready.set()

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
