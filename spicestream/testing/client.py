"""A headless SPICE client for tests: links like spice-gtk, keeps the primary surface as numpy.

    with TestClient("127.0.0.1", port, password="s3cret") as client:
        client.wait_for(lambda c: c.marked)
        assert (client.frame == expected).all()
        client.key(0x1E)

It runs its own event loop in a thread, so tests stay synchronous. It speaks through the same
message declarations as the server (`protocol.messages`), from the client's side.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import numpy as np

from ..protocol.channel import ChannelProtocol
from ..protocol.constants import CommonCap, DisplayCap, LinkError
from ..protocol.constants import ChannelType as Ch
from ..protocol.link import LINK_HEADER, ClientLink
from ..protocol.agent import AgentCodec, AgentMsg, AgentStream, caps_of, caps_words
from ..protocol.agent import chunks as agent_chunks
from ..protocol.messages import CLIENT, SERVER
from ..video.codec import Codec
from .images import decode_image

DEFAULT_DISPLAY_CAPS = (DisplayCap.SIZED_STREAM, DisplayCap.MONITORS_CONFIG,
                        DisplayCap.STREAM_REPORT, DisplayCap.LZ4_COMPRESSION,
                        DisplayCap.MULTI_CODEC, DisplayCap.CODEC_MJPEG)


class LinkRefused(Exception):
    def __init__(self, error: LinkError, stage: str):
        super().__init__(f"link refused at {stage}: {error.name}")
        self.error = error


class ClientChannel:
    """One linked channel: a reader loop feeding a client-side ChannelProtocol."""

    def __init__(self, client: "TestClient", channel_type: int, reader, writer, mini: bool):
        self.client, self.channel_type = client, channel_type
        self.reader, self.writer = reader, writer
        self.proto = ChannelProtocol(channel_type, mini, side="client")
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while data := await self.reader.read(1 << 20):
                for message in self.proto.receive_data(data):
                    self.client._on_message(self.channel_type, message)
                self.flush()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.client.closed_channels.add(self.channel_type)

    def send(self, message) -> None:
        self.proto.send(message)
        self.flush()

    def flush(self) -> None:
        parts = self.proto.data_to_send()
        if parts:
            self.writer.writelines(parts)


class TestClient:
    __test__ = False  # not a pytest test class

    def __init__(self, host: str, port: int, password: str | None = None,
                 display_caps=DEFAULT_DISPLAY_CAPS, channels=(Ch.DISPLAY, Ch.INPUTS, Ch.CURSOR),
                 mini_header: bool = True, main_caps=(), decode_streams: bool = True,
                 send_reports: bool = True, log_limit: int = 200, tls_port: int | None = None,
                 tls=None, tls_first: bool = False, agent_caps=None, agent_tokens: int = 0xFFFFFFFF,
                 channel_caps: dict | None = None):
        self.host, self.port, self.password = host, port, password
        # Like spice-gtk: a channel refused with NEED_SECURED links again on the TLS port.
        self.tls_port, self.tls, self.tls_first = tls_port, tls, tls_first
        self.secured_channels: set[int] = set()
        self.display_caps, self.wanted, self.main_caps = display_caps, channels, main_caps
        self.channel_caps = channel_caps or {}  # caps of the other channels, by type
        self.common_caps = (CommonCap.PROTOCOL_AUTH_SELECTION,) + (
            (CommonCap.MINI_HEADER,) if mini_header else ())
        self.frame: np.ndarray | None = None
        self.marked = False
        self.session_id = 0
        self.channels: dict[int, ClientChannel] = {}
        self.closed_channels: set[int] = set()
        self.messages: list = []  # every non-base message received, in order
        self.draws = 0
        self.bytes_drawn = 0
        self.cursor = None
        self.motion_acks = 0
        self.decode_streams = decode_streams
        self.streams: dict[int, dict] = {}  # id -> {"create": msg, "decoder": ..., "frames": n}
        self.stream_log: list[dict] = []  # one entry per received stream frame
        self.log_limit = log_limit
        self.send_reports = send_reports
        self.reports_sent = 0
        self._mm_base: tuple[int, float] | None = None  # (server mm-time, our monotonic then)
        # The agent, as spice-gtk drives it: given `agent_caps`, AGENT_START with
        # `agent_tokens` and our capabilities (request=1) once MAIN_INIT says one is there.
        self.agent_caps = None if agent_caps is None else frozenset(agent_caps)
        self.agent_tokens_start = agent_tokens
        self.agent_codec = AgentCodec()
        self.agent_server_caps: set[int] | None = None
        self.agent_messages: list = []  # (AgentMsg, message) received, in order
        self.agent_tokens = 0  # AGENT_DATA we may still send
        self._agent_stream = AgentStream(lambda kind: 1 << 30)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    # -- synchronous API for tests ---------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> "TestClient":
        try:
            asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def send(self, channel_type: int, message) -> None:
        channel = self.channels[channel_type]
        self._loop.call_soon_threadsafe(channel.send, message)

    def stall(self, channel_type: int = Ch.DISPLAY) -> None:
        """Stop reading a channel's socket (a client that hangs); `resume` undoes it."""
        transport = self.channels[channel_type].writer.transport
        self._loop.call_soon_threadsafe(transport.pause_reading)

    def resume(self, channel_type: int = Ch.DISPLAY) -> None:
        transport = self.channels[channel_type].writer.transport
        self._loop.call_soon_threadsafe(transport.resume_reading)

    def agent_send(self, kind, **fields) -> None:
        """Send one agent message (chunked, spending tokens), from the test's thread."""
        self._loop.call_soon_threadsafe(lambda: self._agent_send(kind, **fields))

    def agent_send_raw(self, chunk: bytes) -> None:
        """One AGENT_DATA of arbitrary bytes (hostile-input tests)."""
        self.send(Ch.MAIN, CLIENT.MAIN_AGENT_DATA(chunk))

    def _agent_send(self, kind, **fields) -> None:
        packed = self.agent_codec.pack(kind, self.agent_codec.make(kind, **fields))
        for part in agent_chunks(packed):
            self.agent_tokens -= 1
            self.channels[Ch.MAIN].send(CLIENT.MAIN_AGENT_DATA(part))

    def agent_received(self, kind) -> list:
        return [m for k, m in list(self.agent_messages) if k == kind]

    def key(self, scancode: int) -> None:
        """Press and release a key the way spice-gtk does for a quick tap (KEY_SCANCODE)."""
        prefix = b"\xe0" if scancode & 0x100 else b""
        code = scancode & 0x7F
        self.send(Ch.INPUTS, CLIENT.INPUTS_KEY_SCANCODE(prefix + bytes([code]) + prefix + bytes([code | 0x80])))

    def close(self) -> None:
        async def _close():
            for channel in self.channels.values():
                channel.writer.close()
                channel.task.cancel()
            await asyncio.gather(*(c.task for c in self.channels.values()), return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()  # its selector and self-pipe are fds too
        for stream in self.streams.values():
            if stream["decoder"] is not None:
                stream["decoder"].close()
        self.streams.clear()

    def __enter__(self) -> "TestClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- linking ---------------------------------------------------------------------------------
    async def _link(self, channel_type: int, connection_id: int, caps=()) -> ClientChannel:
        secure = self.tls_first
        while True:
            if secure:
                reader, writer = await asyncio.open_connection(self.host, self.tls_port, ssl=self.tls,
                                                               server_hostname="localhost")
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            link = ClientLink(connection_id, channel_type, 0, caps, self.common_caps)
            writer.write(link.hello)
            header = await reader.readexactly(LINK_HEADER.size)
            size = struct.unpack_from("<I", header, 12)[0]
            error, pub, common, _ = ClientLink.parse_reply(header, await reader.readexactly(size))
            if error == LinkError.NEED_SECURED and not secure and self.tls_port is not None:
                writer.close()
                secure = True
                continue
            break
        if error != LinkError.OK:
            writer.close()
            raise LinkRefused(error, "reply")
        writer.write(ClientLink.ticket(pub, self.password))
        (result,) = struct.unpack("<I", await reader.readexactly(4))
        if result != LinkError.OK:
            writer.close()
            raise LinkRefused(LinkError(result), "result")
        if secure:
            self.secured_channels.add(channel_type)
        mini = link.client_mini and bool(common and common[0] & (1 << CommonCap.MINI_HEADER))
        channel = ClientChannel(self, channel_type, reader, writer, mini)
        self.channels[channel_type] = channel
        return channel

    async def _connect(self) -> None:
        self.display_init_sent: float | None = None
        self._channels_list = asyncio.get_running_loop().create_future()
        await self._link(Ch.MAIN, 0, self.main_caps)
        await asyncio.wait_for(self._channels_list, 10)
        for t in self.wanted:
            caps = self.display_caps if t == Ch.DISPLAY else self.channel_caps.get(t, ())
            channel = await self._link(t, self.session_id, caps)
            if t == Ch.DISPLAY:
                channel.send(CLIENT.DISPLAY_INIT(1, 20 << 20, 1, 3 << 20))
                self.display_init_sent = time.monotonic()

    # -- messages ----------------------------------------------------------------------------------
    def _on_message(self, channel_type: int, message) -> None:
        self.messages.append(message)
        kind = type(message)
        if kind is SERVER.MAIN_INIT:
            self.session_id = message.session_id
            self._mm_base = (message.multi_media_time, time.monotonic())
            self.channels[Ch.MAIN].send(CLIENT.MAIN_ATTACH_CHANNELS())
            self.agent_tokens = message.agent_tokens
            if message.agent_connected and self.agent_caps is not None:
                self.channels[Ch.MAIN].send(CLIENT.MAIN_AGENT_START(self.agent_tokens_start))
                self._agent_send(AgentMsg.ANNOUNCE_CAPABILITIES, request=1, caps=caps_words(self.agent_caps))
        elif kind is SERVER.MAIN_AGENT_DATA:
            for agent_kind, body in self._agent_stream.feed(message.data):
                decoded = self.agent_codec.unpack(agent_kind, body)
                if agent_kind == AgentMsg.ANNOUNCE_CAPABILITIES:
                    self.agent_server_caps = caps_of(decoded.caps)
                    self.agent_codec = AgentCodec(self.agent_server_caps & self.agent_caps)
                self.agent_messages.append((AgentMsg(agent_kind), decoded))
        elif kind is SERVER.MAIN_AGENT_TOKEN:
            self.agent_tokens += message.num_tokens
        elif kind is SERVER.MAIN_MULTI_MEDIA_TIME:
            self._mm_base = (message.time, time.monotonic())
        elif kind is SERVER.DISPLAY_STREAM_ACTIVATE_REPORT:
            stream = self.streams.get(message.stream_id)
            if stream is not None:
                stream["report"] = {"unique_id": message.unique_id, "window": message.max_window_size,
                                    "frames": 0, "drops": 0, "start": None}
        elif kind is SERVER.MAIN_CHANNELS_LIST:
            if not self._channels_list.done():
                self._channels_list.set_result(message.channels)
        elif kind is SERVER.DISPLAY_SURFACE_CREATE:
            self.frame = np.zeros((message.height, message.width, 4), np.uint8)
        elif kind is SERVER.DISPLAY_SURFACE_DESTROY:
            self.frame = None
        elif kind is SERVER.DISPLAY_MARK:
            self.marked = True
        elif kind is SERVER.DISPLAY_DRAW_COPY:
            self._draw_copy(message)
        elif kind is SERVER.DISPLAY_STREAM_CREATE:
            self._stream_create(message)
        elif kind in (SERVER.DISPLAY_STREAM_DATA, SERVER.DISPLAY_STREAM_DATA_SIZED):
            self._stream_data(message)
        elif kind is SERVER.DISPLAY_STREAM_DESTROY:
            stream = self.streams.pop(message.id, None)
            if stream and stream["decoder"] is not None:
                stream["decoder"].close()
        elif kind is SERVER.CURSOR_INIT:
            self.cursor = message
        elif kind is SERVER.INPUTS_MOUSE_MOTION_ACK:
            self.motion_acks += 1

    def _draw_copy(self, m) -> None:
        if self.frame is None:
            raise AssertionError("DRAW_COPY before SURFACE_CREATE")
        pixels = decode_image(m.image)
        src = pixels[m.src_area.top : m.src_area.bottom, m.src_area.left : m.src_area.right]
        box = m.box
        self.frame[box.top : box.bottom, box.left : box.right] = src
        self.draws += 1
        self.bytes_drawn += len(m.image)

    def _stream_create(self, m) -> None:
        if m.id in self.streams:
            raise AssertionError(f"stream {m.id} created twice")
        decoder = None
        if self.decode_streams:
            from .decoder import StreamDecoder

            decoder = StreamDecoder(Codec(m.codec_type))
        self.streams[m.id] = {"create": m, "decoder": decoder, "frames": 0}

    def _stream_data(self, m) -> None:
        stream = self.streams.get(m.id)
        if stream is None:
            raise AssertionError(f"data for unknown stream {m.id}")
        stream["frames"] += 1
        arrival = time.monotonic()
        margin = self._margin(m.multi_media_time, arrival)
        entry = {"id": m.id, "mm_time": m.multi_media_time, "arrival": arrival,
                 "size": len(m.data), "picture": None, "margin_ms": margin}
        self._report(m, stream, margin)
        dest = getattr(m, "dest", None) or stream["create"].dest
        if stream["decoder"] is not None:
            picture = stream["decoder"].decode(m.data)
            if picture is not None and not stream["create"].flags & 1:
                picture = picture[::-1]  # not TOP_DOWN: the stream's rows are bottom-up
            entry["picture"] = picture
            if picture is not None and self.frame is not None:
                h, w = dest.bottom - dest.top, dest.right - dest.left
                if picture.shape[:2] == (h, w):
                    self.frame[dest.top : dest.bottom, dest.left : dest.right] = picture
        self.stream_log.append(entry)
        del self.stream_log[: -self.log_limit]  # bounded: tests look at recent frames

    def client_mm_time(self, now: float) -> int:
        """The client's media clock, as spice-gtk keeps it: last value + elapsed time."""
        base, at = self._mm_base
        return (base + int((now - at) * 1000)) & 0xFFFFFFFF

    def _margin(self, stamp: int, now: float) -> int | None:
        if self._mm_base is None:
            return None
        diff = (stamp - self.client_mm_time(now)) & 0xFFFFFFFF
        return diff - (1 << 32) if diff & 0x80000000 else diff

    def _report(self, m, stream: dict, margin: int | None) -> None:
        """STREAM_REPORT every `window` frames, as spice-gtk does (brief §5.10.7)."""
        report = stream.get("report")
        if not self.send_reports or report is None or margin is None:
            return
        report["frames"] += 1
        report["drops"] += margin < 0
        if report["start"] is None:
            report["start"] = m.multi_media_time
        if report["frames"] >= report["window"]:
            self.channels[Ch.DISPLAY].send(CLIENT.DISPLAY_STREAM_REPORT(
                m.id, report["unique_id"], report["start"], m.multi_media_time, report["frames"],
                report["drops"], margin, 0xFFFFFFFF))
            self.reports_sent += 1
            report.update(frames=0, drops=0, start=None)
