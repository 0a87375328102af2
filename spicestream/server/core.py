"""Loop-side server state: sessions, link decisions, channel handlers, application callbacks.

Everything here runs on the server's event loop thread. One session is one main channel plus
the secondary channels that linked with its session id (brief §1.5); closing the main
channel ends the session and closes its other channels.
"""

from __future__ import annotations

import collections
import inspect
import logging
import secrets
import time
import uuid as uuidlib
from typing import Callable

from ..display.surface import Display
from ..audio.output import AudioOutput
from ..protocol.constants import (
    ChannelType,
    DisplayCap,
    InputsCap,
    LinkError,
    MainCap,
    MouseMode,
    PlaybackCap,
    RecordCap,
)
from ..protocol.link import LinkRequested
from ..protocol.messages import SERVER
from ..video.streampolicy import wire_stamp
from .agent import ClipboardBoard
from .audio import AudioPump, PlaybackChannel, RecordChannel
from .channels import CursorChannel, DisplayChannel, InputsChannel, MainChannel
from .filexfer import FileTransferConfig
from .connection import UnlinkedConnections
from .linkkeys import HelloLimiter, LinkKeys
from .sharing import EncoderRegistry
from .tickets import Tickets

log = logging.getLogger("spicestream.server")

CHANNEL_CAPS = {
    ChannelType.MAIN: (MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.NAME_AND_UUID,
                       MainCap.AGENT_CONNECTED_TOKENS, MainCap.SEAMLESS_MIGRATE),
    ChannelType.DISPLAY: (DisplayCap.MONITORS_CONFIG, DisplayCap.STREAM_REPORT,
                          DisplayCap.PREF_VIDEO_CODEC_TYPE),
    ChannelType.INPUTS: (InputsCap.KEY_SCANCODE,),
    ChannelType.CURSOR: (),
    ChannelType.PLAYBACK: (PlaybackCap.VOLUME, PlaybackCap.LATENCY, PlaybackCap.OPUS),
    ChannelType.RECORD: (RecordCap.VOLUME, RecordCap.OPUS),
}
HANDLERS = {
    ChannelType.MAIN: MainChannel,
    ChannelType.DISPLAY: DisplayChannel,
    ChannelType.INPUTS: InputsChannel,
    ChannelType.CURSOR: CursorChannel,
    ChannelType.PLAYBACK: PlaybackChannel,
    ChannelType.RECORD: RecordChannel,
}
# Offered to clients in CHANNELS_LIST, in this order (main is implicit).
OFFERED = [(ChannelType.DISPLAY, 0), (ChannelType.INPUTS, 0), (ChannelType.CURSOR, 0),
           (ChannelType.PLAYBACK, 0), (ChannelType.RECORD, 0)]
# How far the client's media clock runs behind ours (brief §4.4). spice-server uses 400 ms
# for every stream; we keep the clocks together and put the delay in each stream's stamps,
# where each client's reports steer it (video/streampolicy.py, Playout's lead).
INIT_LATENCY_MS = 0
DEFAULT_MAX_CLIENTS = 8
DEFAULT_MAX_CLIPBOARD = 16 << 20  # bytes of one clipboard content, either way


class Session:
    def __init__(self, session_id: int):
        self.session_id = session_id
        self.main: MainChannel | None = None
        self.channels: set = set()
        self.mouse_mode = MouseMode.CLIENT
        self.pointer = (0, 0, 0)  # x, y, buttons
        self.input_enabled = True  # the server may make a watcher view-only


class ServerCore:
    def __init__(self, display: Display, password: bytes | None, name: str, video_codecs=None):
        self.display = display
        self.video_codecs = video_codecs  # VideoCodecs, or None when streaming is off
        self.tickets = Tickets(password)
        self.secure_channels: set[int] = set()  # channel types refused on plain links
        self.web = None  # a WebRoot when browsers get the spice-html5 page (--web)
        self.web_origins: frozenset[str] = frozenset()  # other pages that may open a WebSocket
        self.name = name
        self.uuid = uuidlib.uuid4().bytes
        self.sessions: dict[int, Session] = {}
        self.sessions_started = 0  # every client that ever linked its main channel
        self.link_attempts = 0  # link messages received (every channel of every client)
        self.link_refusals: collections.Counter = collections.Counter()  # by reason
        self.encoder_fallbacks: collections.Counter = collections.Counter()  # by codec entry
        self.connections: set = set()
        self.unlinked = UnlinkedConnections()
        self.link_keys = LinkKeys()  # started with the loop (Server.serve)
        self.hellos = HelloLimiter()
        self.display_channels: set[DisplayChannel] = set()
        self.cursor_channels: set[CursorChannel] = set()
        self.cursor: bytes | None = None  # the current shape (None: the default arrow)
        self.encoders = EncoderRegistry()  # shared video encoders, by codec and region
        self.on_key: Callable[[int, bool], None] | None = None
        self.on_pointer: Callable[[int, int, int], None] | None = None
        self.on_clipboard: Callable[[str, bytes, str], None] | None = None
        self.on_resize: Callable[..., None] | None = None
        self.on_file: Callable[[str, str], None] | None = None
        self.clipboard = ClipboardBoard(self, DEFAULT_MAX_CLIPBOARD)
        self.file_transfer: FileTransferConfig | None = None  # off without a folder
        self.audio = AudioPump(self, AudioOutput())  # the Server wires its wake-up to the loop
        self.record_channels: set[RecordChannel] = set()
        self.on_audio_in: Callable[[object, int, int], None] | None = None
        self.latency_ms = INIT_LATENCY_MS
        self.max_clients = DEFAULT_MAX_CLIENTS
        self.offered = OFFERED
        # The one clock the server's time decisions read (tests may replace it): the sender
        # reads it once per event and hands `now` to the pure policies.
        self.clock: Callable[[], float] = time.monotonic
        self._epoch = self.clock()

    # -- clock ------------------------------------------------------------------------------
    def mm_ms(self, monotonic: float) -> int:
        """The server's media clock at a moment measured with time.monotonic(): milliseconds,
        unwrapped (brief §4.4); only what goes on the wire wraps (streampolicy.wire_stamp)."""
        return int((monotonic - self._epoch) * 1000 + 1)

    def mm_time_at(self, monotonic: float) -> int:
        """The wire media time of a moment measured with time.monotonic() (a frame's capture)."""
        return wire_stamp(self.mm_ms(monotonic))

    def client_mm_time(self) -> int:
        return wire_stamp(self.mm_ms(self.clock()) - self.latency_ms)

    # -- link decisions ---------------------------------------------------------------------
    def channel_caps(self, channel_type: int):
        return CHANNEL_CAPS[ChannelType(channel_type)]

    def check_link(self, request: LinkRequested, conn) -> LinkError:
        if (request.channel_type, request.channel_id) not in HANDLERS_WITH_IDS:
            return LinkError.CHANNEL_NOT_AVAILABLE
        if request.channel_type in self.secure_channels and not conn.secure:
            # spice-gtk answers this by linking the channel again on the TLS port (brief §1.7).
            return LinkError.NEED_SECURED
        return LinkError.OK

    def is_guess(self, password: bytes | None, request: LinkRequested) -> bool:
        """A wrong ticket, or a session id that does not exist (what a guesser of either
        presents): counted by the brake (tickets.py) alike."""
        if self.tickets.check(password) is not None:
            return True
        return request.channel_type != ChannelType.MAIN and request.connection_id not in self.sessions

    def authenticate(self, password: bytes | None, request: LinkRequested, conn):
        """Returns (link error, session, reason); the connection logs the refusal once."""
        refused = self.tickets.check(password)
        if refused is not None:
            return LinkError.PERMISSION_DENIED, None, refused
        if request.channel_type == ChannelType.MAIN:
            if len(self.sessions) >= self.max_clients:
                return LinkError.ERROR, None, f"already {len(self.sessions)} clients (--max-clients)"
            session_id = secrets.randbits(32) or 1
            while session_id in self.sessions:
                session_id = secrets.randbits(32) or 1
            session = Session(session_id)
            self.sessions[session_id] = session
            self.sessions_started += 1
            return LinkError.OK, session, ""
        session = self.sessions.get(request.connection_id)
        if session is None:
            return LinkError.BAD_CONNECTION_ID, None, f"unknown session id {request.connection_id:08x}"
        return LinkError.OK, session, ""

    @staticmethod
    def _channel_key(handler) -> tuple[int, int]:
        request = handler.conn.link.request
        return request.channel_type, request.channel_id

    def make_handler(self, request: LinkRequested, session: Session, conn):
        handler = HANDLERS[ChannelType(request.channel_type)](self, session, conn, request)
        if isinstance(handler, MainChannel):
            session.main = handler
        else:
            # One channel of each kind per session: a second link of the same channel replaces
            # the first (a client re-linking after a network hiccup), so extra display channels
            # can never stream into a session counted once against --max-clients.
            key = self._channel_key(handler)
            for other in [c for c in session.channels if self._channel_key(c) == key]:
                other.conn.abort("replaced by a new link of the same channel", logging.INFO)
                session.channels.discard(other)
            session.channels.add(handler)
        return handler

    def channel_closed(self, handler) -> None:
        session = handler.session
        if handler is session.main:
            self.sessions.pop(session.session_id, None)
            for other in list(session.channels):
                other.conn.abort("main channel closed", logging.INFO)
        session.channels.discard(handler)

    def disconnect_all(self, reason: str) -> None:
        """Tell each session's client why (DISCONNECTING on main) and close everything."""
        for session in self.sessions.values():
            if session.main is not None and not session.main.conn.closed:
                session.main.conn.send(SERVER.DISCONNECTING(time.time_ns(), LinkError.OK))
                session.main.conn.flush()
        for conn in list(self.connections):
            conn.abort(reason, logging.INFO)

    # -- display wake-up (called from any thread via the loop) ------------------------------
    def pump_displays(self) -> None:
        for channel in list(self.display_channels):
            channel.writable()

    def control_tick(self, now: float) -> None:
        for channel in list(self.display_channels):
            streams = channel.streams
            if streams is not None:
                streams.control_tick(now)
                if not streams.waiting_frame:
                    # Nothing held back for the link to make room for: what else is new
                    # reaches the channel through its own wake (display, socket, ACK).
                    continue
            channel.writable()  # e.g. a local client's scanout waits for an empty buffer

    def frames_waiting(self) -> bool:
        """A client's stream holds a frame back until the link has room."""
        return any(c.streams is not None and c.streams.waiting_frame for c in self.display_channels)

    def set_cursor(self, cursor: bytes) -> None:
        self.cursor = cursor
        for channel in list(self.cursor_channels):
            channel.set_cursor(cursor)

    # -- application callbacks ----------------------------------------------------------------
    def emit_key(self, scancode: int, pressed: bool) -> None:
        self._call(self.on_key, scancode, pressed)

    def emit_pointer(self, x: int, y: int, buttons: int) -> None:
        self._call(self.on_pointer, x, y, buttons)

    def emit_clipboard(self, mime: str, data: bytes, selection: str) -> None:
        self._call(self.on_clipboard, mime, data, selection)

    def emit_resize(self, width: int, height: int, monitors: list[dict]) -> None:
        """A client asked for this desktop size (its window or monitors). The callback takes
        (width, height) and, if it has a third parameter, the client's monitor list."""
        callback = self.on_resize
        if callback is None:
            log.info("a client asked for %dx%d; no on_resize: the display keeps its size", width, height)
            return
        if _takes_three(callback):
            self._call(callback, width, height, monitors)
        else:
            self._call(callback, width, height)

    def emit_audio_in(self, samples, rate: int, channels: int) -> None:
        self._call(self.on_audio_in, samples, rate, channels)

    def emit_file(self, name: str, path: str) -> None:
        self._call(self.on_file, name, path)

    def agents(self):
        for session in list(self.sessions.values()):
            if session.main is not None and session.main.agent is not None:
                yield session.main.agent

    @staticmethod
    def _call(callback, *args) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # the application's bug; the client connection is not at fault
            log.exception("application callback %r failed", callback)


def _takes_three(callback) -> bool:
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


HANDLERS_WITH_IDS = {(int(t), 0) for t in HANDLERS}
