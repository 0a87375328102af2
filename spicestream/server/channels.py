"""Channel handlers: what each linked channel does with the client's messages (brief §4-§8).

A handler is made after a successful link. `start()` sends the channel's opening messages,
`handle(message)` reacts to one decoded client message, `writable()` is called whenever the
connection can take more data, and `closed()` once when the connection ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..display.images import encode_image, pixels_of
from ..protocol.constants import (
    BUTTON_MASKS,
    ROP_OP_PUT,
    SURFACE_PRIMARY,
    DisplayCap,
    MainCap,
    MouseMode,
    SurfaceFormat,
    has_cap,
)
from ..protocol.channel import ACK_WINDOW
from ..protocol.messages import CLIENT, HEAD, SERVER, ChannelEntry, Point, Point16, Rect
from ..protocol.scancodes import parse_key_code, parse_scancodes
from .agent import AGENT_WINDOW, Agent
from .cursor import default_cursor
from .localgl import LocalGL
from .streaming import StreamSender

if TYPE_CHECKING:
    from .core import ServerCore, Session

log = logging.getLogger("spicestream.channels")

SUPPORTED_MOUSE_MODES = MouseMode.SERVER | MouseMode.CLIENT
PING_INTERVAL_S = 5.0
MOTION_ACK_BUNCH = 4  # SPICE_INPUT_MOTION_ACK_BUNCH: one ack per 4 motion messages


class ChannelHandler:
    def __init__(self, core: "ServerCore", session: "Session", conn, request):
        self.core, self.session, self.conn = core, session, conn
        self.caps = request.channel_caps

    def start(self) -> None:
        pass

    def handle(self, message) -> None:
        pass  # anything a channel does not use is accepted and ignored (brief §3.3)

    def writable(self) -> None:
        pass

    def closed(self) -> None:
        self.core.channel_closed(self)


class MainChannel(ChannelHandler):
    agent: Agent | None = None

    def start(self) -> None:
        core = self.core
        self._pings = 0
        self._ping_timer = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)
        # We are the agent, connected from the start (server/agent.py).
        self.agent = Agent(core, self.conn, self.conn.peer)
        self.conn.send(SERVER.MAIN_INIT(
            session_id=self.session.session_id, display_channels_hint=1,
            supported_mouse_modes=SUPPORTED_MOUSE_MODES, current_mouse_mode=self.session.mouse_mode,
            agent_connected=1, agent_tokens=AGENT_WINDOW, multi_media_time=core.client_mm_time(),
            ram_hint=0))
        if has_cap(self.caps, MainCap.NAME_AND_UUID):
            self.conn.send(SERVER.MAIN_NAME(core.name.encode() + b"\x00"))
            self.conn.send(SERVER.MAIN_UUID(core.uuid))

    def writable(self) -> None:
        if self.agent is not None and self.agent.queue:
            self.agent._pump()  # agent data waiting for room in the socket

    def _ping(self) -> None:
        # Keeps idle links alive through middleboxes and measures the round trip (PONG).
        self._pings += 1
        self.conn.proto.ping(self._pings)
        self.conn.flush()
        self._ping_timer = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)

    def closed(self) -> None:
        self._ping_timer.cancel()
        if self.agent is not None:
            self.agent.closed()
        super().closed()

    def handle(self, message) -> None:
        kind = type(message)
        if kind is CLIENT.MAIN_ATTACH_CHANNELS:
            offered = tuple(ChannelEntry(t, i) for t, i in self.core.offered)
            self.conn.send(SERVER.MAIN_CHANNELS_LIST(offered))
            self.conn.send(SERVER.MAIN_MULTI_MEDIA_TIME(self.core.client_mm_time()))
        elif kind is CLIENT.MAIN_MOUSE_MODE_REQUEST:
            if message.mode in (MouseMode.SERVER, MouseMode.CLIENT):
                self.session.mouse_mode = MouseMode(message.mode)
            self.conn.send(SERVER.MAIN_MOUSE_MODE(SUPPORTED_MOUSE_MODES, self.session.mouse_mode))
        elif kind is CLIENT.MAIN_AGENT_START:
            self.agent.start(message.num_tokens)
        elif kind is CLIENT.MAIN_AGENT_DATA:
            self.agent.data(message.data)
        elif kind is CLIENT.MAIN_AGENT_TOKEN:
            self.agent.token(message.num_tokens)


class DisplayChannel(ChannelHandler):
    def start(self) -> None:
        self.view = self.core.display.attach()
        self.lz4 = has_cap(self.caps, DisplayCap.LZ4_COMPRESSION)
        self.monitors_config = has_cap(self.caps, DisplayCap.MONITORS_CONFIG)
        self.has_surface = False
        self.marked = False
        self.bytes_sent = 0
        self.streams = None
        self.local_gl = None
        if self.conn.is_unix and has_cap(self.caps, DisplayCap.GL_SCANOUT):
            self.local_gl = LocalGL(self)  # a local client takes the scanout's fd itself
        elif self.core.video_codecs is not None:
            self.streams = StreamSender(self, self.core.video_codecs, self.caps)
        # Twice spice-server's window: an H.264 frame is two messages (the frame and its
        # follow-up picture, video/h264skip.py), and the window bounds frames in flight.
        self.conn.proto.set_ack(2 * ACK_WINDOW)
        self.core.display_channels.add(self)
        self.writable()

    def handle(self, message) -> None:
        kind = type(message)
        if kind is CLIENT.DISPLAY_INIT:
            log.debug("%s: display init %s", self.conn.peer, message)
        elif kind is CLIENT.DISPLAY_STREAM_REPORT and self.streams is not None:
            self.streams.report(message)
        elif kind is CLIENT.DISPLAY_PREFERRED_VIDEO_CODEC_TYPE and self.streams is not None:
            self.streams.set_preferred(list(message.codecs))
        elif kind is CLIENT.DISPLAY_GL_DRAW_DONE and self.local_gl is not None:
            self.local_gl.draw_done()  # elsewhere it answers nothing we sent: ignored

    def writable(self) -> None:
        """Send pending damage while the socket and the ACK window allow it.

        Damage is taken from the view all at once, so what is in flight beyond the socket's
        high-water mark is at most one frame's worth of rectangles.
        """
        conn = self.conn
        if self.streams is not None and self.has_surface:
            # First: a stream that ended leaves its area as damage, sent below; one that
            # started takes its area out of the damage.
            self.streams.sync()
        while conn.can_send and self.view.pending:
            size = self.view.new_surface()
            if size is not None:
                if self.streams is not None:
                    self.streams.end(lossless=False)
                self._new_surface(*size)
            if self.streams is not None:
                self.streams.sync()  # first: a stream's area needs no lossless update
            frame, rects = self.view.take()
            if self.core.display.scanout is not None:
                rects = []  # a scanout reaches clients as video or as its fd, never as images
            for x, y, w, h in rects:
                self._draw_copy(frame, x, y, w, h)
            if not self.marked:
                conn.send(SERVER.DISPLAY_MARK())
                self.marked = True
            conn.flush()
        if self.streams is not None and self.has_surface:
            self.streams.feed()  # of the stream synced above
            conn.flush()
        if self.local_gl is not None and self.marked:
            self.local_gl.pump()

    def _new_surface(self, width: int, height: int) -> None:
        send = self.conn.send
        if self.has_surface:
            send(SERVER.DISPLAY_SURFACE_DESTROY(0))
        send(SERVER.DISPLAY_SURFACE_CREATE(0, width, height, SurfaceFormat.XRGB32, SURFACE_PRIMARY))
        self.has_surface = True
        self.send_monitors_config()

    def send_monitors_config(self) -> None:
        if self.monitors_config:
            display = self.core.display
            head = HEAD(monitor_id=0, surface_id=0, width=display.width, height=display.height,
                        x=0, y=0, flags=0)
            self.conn.send(SERVER.DISPLAY_MONITORS_CONFIG(1, 1, HEAD.pack(head)))

    def _draw_copy(self, frame, x: int, y: int, w: int, h: int) -> None:
        image = encode_image(pixels_of(frame, x, y, w, h), self.lz4)
        box = Rect(top=y, left=x, bottom=y + h, right=x + w)
        self.bytes_sent += self.conn.proto.send(SERVER.DISPLAY_DRAW_COPY(
            surface_id=0, box=box, clip=None, src_bitmap=0, src_area=Rect(0, 0, h, w),
            rop=ROP_OP_PUT, scale_mode=0, mask_flags=0, mask_pos=Point(0, 0), mask_bitmap=0,
            image=image))

    def closed(self) -> None:
        if self.streams is not None:
            self.streams.close()
        if self.local_gl is not None:
            self.local_gl.close()
        self.core.display_channels.discard(self)
        self.core.display.detach(self.view)
        super().closed()


class InputsChannel(ChannelHandler):
    def start(self) -> None:
        self.motions = 0
        self.modifiers = 0
        self.conn.send(SERVER.INPUTS_INIT(0))

    def handle(self, message) -> None:
        kind = type(message)
        if kind in MOTION_KINDS:
            self._count_motion()  # acked even when ignored, or the client's pointer freezes
        if not self.session.input_enabled:
            return
        if kind in (CLIENT.INPUTS_KEY_DOWN, CLIENT.INPUTS_KEY_UP):
            for code, pressed in parse_key_code(message.code):
                self.core.emit_key(code, pressed)
        elif kind is CLIENT.INPUTS_KEY_SCANCODE:
            for code, pressed in parse_scancodes(message.codes):
                self.core.emit_key(code, pressed)
        elif kind is CLIENT.INPUTS_KEY_MODIFIERS:
            self.modifiers = message.modifiers
        elif kind is CLIENT.INPUTS_MOUSE_POSITION:
            # Clamped to the surface like motion: x = 0xFFFFFFFF is no position, and the
            # application (or XTEST's 16-bit coordinates) must never see it.
            display = self.core.display
            x = min(message.x, display.width - 1)
            y = min(message.y, display.height - 1)
            self._pointer(x, y, message.buttons_state)
        elif kind is CLIENT.INPUTS_MOUSE_MOTION:
            x, y, _ = self.session.pointer
            display = self.core.display
            x = min(max(x + message.dx, 0), display.width - 1)
            y = min(max(y + message.dy, 0), display.height - 1)
            self._pointer(x, y, message.buttons_state)
        elif kind in (CLIENT.INPUTS_MOUSE_PRESS, CLIENT.INPUTS_MOUSE_RELEASE):
            mask = BUTTON_MASKS.get(message.button, 0)
            buttons = message.buttons_state | mask
            if kind is CLIENT.INPUTS_MOUSE_RELEASE:
                buttons &= ~mask
            x, y, _ = self.session.pointer
            self._pointer(x, y, buttons)

    def _pointer(self, x: int, y: int, buttons: int) -> None:
        self.session.pointer = (x, y, buttons)
        self.core.emit_pointer(x, y, buttons)

    def _count_motion(self) -> None:
        # Clients stop sending motion after 8 unacknowledged messages (brief §7.1).
        self.motions += 1
        if self.motions % MOTION_ACK_BUNCH == 0:
            self.conn.send(SERVER.INPUTS_MOUSE_MOTION_ACK())


MOTION_KINDS = (CLIENT.INPUTS_MOUSE_POSITION, CLIENT.INPUTS_MOUSE_MOTION)


class CursorChannel(ChannelHandler):
    def start(self) -> None:
        self.core.cursor_channels.add(self)
        self.conn.send(SERVER.CURSOR_INIT(position=Point16(0, 0), trail_length=0,
                                          trail_frequency=0, visible=1,
                                          cursor=self.core.cursor or default_cursor()))

    _pending: bytes | None = None

    def set_cursor(self, cursor: bytes) -> None:
        # A shape supersedes the last: while the client is not reading (socket or ACK window
        # full), keep only the newest and send it once there is room again.
        self._pending = cursor
        self.writable()

    def writable(self) -> None:
        if self._pending is None or not self.conn.can_send:
            return
        cursor, self._pending = self._pending, None
        self.conn.send(SERVER.CURSOR_SET(position=Point16(0, 0), visible=1, cursor=cursor))
        self.conn.flush()

    def closed(self) -> None:
        self.core.cursor_channels.discard(self)
        super().closed()

