"""The VD_AGENT protocol, spoken by spicestream itself (it is its own agent: no guest daemon).

Agent messages travel inside the main channel's AGENT_DATA messages (brief §4): a 20-byte
VDAgentMessage header, then the body, split into chunks of at most MAX_CHUNK bytes. Like the
channel messages (messages.py), every agent message is declared once, as a row of
AGENT_TABLE, and both directions are derived from it.

Some fields exist only when both ends announced a capability (vd_agent.h writes them as
`#if 0 /* VD_AGENT_CAP_... */` blocks): they are declared `Negotiated(cap, field)` and an
`AgentCodec` made for the agreed capabilities packs or skips them; decoded messages always
have them (with the field's default when absent).

Layouts verified against spice-protocol's spice/vd_agent.h and spice-gtk 0.42's
src/channel-main.c (see the table's comments for what each side does with them).
"""

from __future__ import annotations

from collections import namedtuple
from enum import IntEnum
from typing import Any

from .wire import Layout, Padding, ProtocolError, Rest, i32, u8, u32, u64

PROTOCOL = 1  # VD_AGENT_PROTOCOL
MAX_CHUNK = 2048  # VD_AGENT_MAX_DATA_SIZE: bytes of agent stream per AGENT_DATA message
HEADER = Layout("VDAgentMessage", [("protocol", u32), ("type", u32), ("opaque", u64), ("size", u32)])
HEADER_SIZE = HEADER.fixed_size  # 20


class AgentMsg(IntEnum):
    MOUSE_STATE = 1
    MONITORS_CONFIG = 2
    REPLY = 3
    CLIPBOARD = 4
    DISPLAY_CONFIG = 5
    ANNOUNCE_CAPABILITIES = 6
    CLIPBOARD_GRAB = 7
    CLIPBOARD_REQUEST = 8
    CLIPBOARD_RELEASE = 9
    FILE_XFER_START = 10
    FILE_XFER_STATUS = 11
    FILE_XFER_DATA = 12
    CLIENT_DISCONNECTED = 13
    MAX_CLIPBOARD = 14
    AUDIO_VOLUME_SYNC = 15
    GRAPHICS_DEVICE_INFO = 16


class AgentCap(IntEnum):
    MOUSE_STATE = 0
    MONITORS_CONFIG = 1
    REPLY = 2
    CLIPBOARD = 3
    DISPLAY_CONFIG = 4
    CLIPBOARD_BY_DEMAND = 5
    CLIPBOARD_SELECTION = 6
    SPARSE_MONITORS_CONFIG = 7
    GUEST_LINEEND_LF = 8
    GUEST_LINEEND_CRLF = 9
    MAX_CLIPBOARD = 10
    AUDIO_VOLUME_SYNC = 11
    MONITORS_CONFIG_POSITION = 12
    FILE_XFER_DISABLED = 13
    FILE_XFER_DETAILED_ERRORS = 14
    GRAPHICS_DEVICE_INFO = 15
    CLIPBOARD_NO_RELEASE_ON_REGRAB = 16
    CLIPBOARD_GRAB_SERIAL = 17


class ClipboardType(IntEnum):
    NONE = 0
    UTF8_TEXT = 1
    IMAGE_PNG = 2
    IMAGE_BMP = 3
    IMAGE_TIFF = 4
    IMAGE_JPG = 5
    FILE_LIST = 6


class Selection(IntEnum):
    CLIPBOARD = 0
    PRIMARY = 1
    SECONDARY = 2


class Reply(IntEnum):
    SUCCESS = 1
    ERROR = 2


class XferStatus(IntEnum):
    CAN_SEND_DATA = 0
    CANCELLED = 1
    ERROR = 2
    SUCCESS = 3
    NOT_ENOUGH_SPACE = 4
    SESSION_LOCKED = 5
    VDAGENT_NOT_CONNECTED = 6
    DISABLED = 7


class XferErrorType(IntEnum):  # VDAgentFileXferStatusError.error_type
    GLIB_IO = 0


MONITORS_USE_POS = 1  # VD_AGENT_CONFIG_MONITORS_FLAG_USE_POS
MONITORS_PHYSICAL_SIZE = 2  # ...FLAG_PHYSICAL_SIZE: a VDAgentMonitorMM per monitor follows


class Negotiated:
    """A field present only when `cap` was announced by both ends; `default` otherwise."""

    def __init__(self, cap: AgentCap, field: Any, default: Any = None):
        self.cap, self.field, self.default = cap, field, default


def _selection(default: int = Selection.CLIPBOARD) -> list[tuple[str, Any]]:
    # u8 selection + 3 reserved bytes, before everything else (vd_agent.h).
    return [("selection", Negotiated(AgentCap.CLIPBOARD_SELECTION, u8, default)),
            ("reserved", Negotiated(AgentCap.CLIPBOARD_SELECTION, Padding(3)))]


# (type, fields). Multi-element payloads (monitor lists, clipboard types, capability words)
# are `Rest()` bytes, read with the helpers below: their counts come from elsewhere in the
# message or from its size.
AGENT_TABLE: list[tuple[AgentMsg, list[tuple[str, Any]]]] = [
    # client -> agent: the client's monitors (resize-guest). VDAgentMonConfig x count follows.
    (AgentMsg.MONITORS_CONFIG, [("num_of_monitors", u32), ("flags", u32), ("monitors", Rest())]),
    # agent -> client: the outcome of a MONITORS_CONFIG or DISPLAY_CONFIG.
    (AgentMsg.REPLY, [("type", u32), ("error", u32)]),
    (AgentMsg.CLIPBOARD, _selection() + [("type", u32), ("data", Rest())]),
    (AgentMsg.DISPLAY_CONFIG, [("flags", u32), ("depth", u32)]),
    # both ways; `caps` is u32 words to the end of the message.
    (AgentMsg.ANNOUNCE_CAPABILITIES, [("request", u32), ("caps", Rest())]),
    (AgentMsg.CLIPBOARD_GRAB, _selection() + [
        ("serial", Negotiated(AgentCap.CLIPBOARD_GRAB_SERIAL, u32, 0)), ("types", Rest())]),
    (AgentMsg.CLIPBOARD_REQUEST, _selection() + [("type", u32)]),
    (AgentMsg.CLIPBOARD_RELEASE, _selection()),
    # client -> agent: `data` is a GKeyFile text ([vdagent-file-xfer] name=, size=).
    (AgentMsg.FILE_XFER_START, [("id", u32), ("data", Rest())]),
    # both ways; `data` carries the detailed error (FILE_XFER_DETAILED_ERRORS) if any.
    (AgentMsg.FILE_XFER_STATUS, [("id", u32), ("result", u32), ("data", Rest())]),
    (AgentMsg.FILE_XFER_DATA, [("id", u32), ("size", u64), ("data", Rest())]),
    (AgentMsg.CLIENT_DISCONNECTED, [("error_code", u32)]),
    (AgentMsg.MAX_CLIPBOARD, [("max", i32)]),
]

MON_CONFIG = Layout("VDAgentMonConfig", [("height", u32), ("width", u32), ("depth", u32),
                                         ("x", i32), ("y", i32)])
XFER_NOT_ENOUGH_SPACE = Layout("VDAgentFileXferStatusNotEnoughSpace", [("disk_free_space", u64)])
XFER_ERROR = Layout("VDAgentFileXferStatusError", [("error_type", u8), ("error_code", u32)])

# The largest message of each type we accept from a client, body only. Clipboard data is
# bounded by the server's own limit (AgentCodec.limits); file data arrives in pieces.
DEFAULT_LIMIT = 4096
BODY_LIMITS = {
    AgentMsg.MONITORS_CONFIG: 8 + 16 * (MON_CONFIG.fixed_size + 8),  # 16 monitors, with mm
    AgentMsg.FILE_XFER_START: 8192,
    AgentMsg.FILE_XFER_DATA: 12 + 64 * 1024,
}


class AgentCodec:
    """Packs and unpacks agent message bodies for the capabilities both ends announced."""

    def __init__(self, caps: set[int] | frozenset[int] = frozenset()):
        self.caps = frozenset(caps)
        self.types: dict[AgentMsg, type] = {}
        self._layouts: dict[AgentMsg, tuple[Layout, list[tuple[str, Any]]]] = {}
        for kind, fields in AGENT_TABLE:
            self.types[kind] = namedtuple(kind.name.title().replace("_", ""), [n for n, _ in fields])
            present = [(n, f.field if isinstance(f, Negotiated) else f) for n, f in fields
                       if not isinstance(f, Negotiated) or f.cap in self.caps]
            self._layouts[kind] = (Layout(kind.name, present), fields)

    def make(self, kind: AgentMsg, **values):
        """A message of `kind`; negotiated fields left out take their defaults."""
        fields = self._layouts[kind][1]
        full = {n: (f.default if isinstance(f, Negotiated) else None) for n, f in fields}
        full.update(values)
        return self.types[kind](**full)

    def pack(self, kind: AgentMsg, message, opaque: int = 0) -> bytes:
        """Header and body of one agent message."""
        layout, _ = self._layouts[kind]
        body = layout.pack(layout.type(*(getattr(message, n) for n, _ in layout.fields)))
        return HEADER.pack(HEADER.type(PROTOCOL, int(kind), opaque, len(body))) + body

    def unpack(self, kind: int, body: bytes):
        """The message of a known type, or None for one we do not speak. Raises ProtocolError."""
        try:
            kind = AgentMsg(kind)
        except ValueError:
            return None
        if kind not in self._layouts:
            return None
        layout, fields = self._layouts[kind]
        got = layout.unpack(body)._asdict()
        return self.make(kind, **{n: got.get(n, f.default if isinstance(f, Negotiated) else None)
                                  for n, f in fields})


def caps_words(caps) -> bytes:
    words = [0] * (max(caps, default=0) // 32 + 1)
    for cap in caps:
        words[cap // 32] |= 1 << (cap % 32)
    return b"".join(u32.pack(w) for w in words)


def caps_of(words: bytes, limit_words: int = 16) -> set[int]:
    """The capability bits in a run of u32 words (trailing partial words are ignored)."""
    caps = set()
    for i in range(min(len(words) // 4, limit_words)):
        word = u32.unpack(memoryview(words), i * 4)[0]
        caps.update(i * 32 + bit for bit in range(32) if word >> bit & 1)
    return caps


def u32_list(data: bytes, limit: int = 64) -> list[int]:
    if len(data) % 4:
        raise ProtocolError(f"a u32 list of {len(data)} bytes")
    n = len(data) // 4
    if n > limit:
        raise ProtocolError(f"a list of {n} entries (at most {limit})")
    return [u32.unpack(memoryview(data), i * 4)[0] for i in range(n)]


def monitors_of(message, limit: int = 16) -> list:
    """The VDAgentMonConfig entries of a MONITORS_CONFIG."""
    n = message.num_of_monitors
    if n > limit:
        raise ProtocolError(f"{n} monitors (at most {limit})")
    size = MON_CONFIG.fixed_size
    if len(message.monitors) < n * size:
        raise ProtocolError(f"{n} monitors do not fit in {len(message.monitors)} bytes")
    return [MON_CONFIG.unpack(message.monitors[i * size:(i + 1) * size]) for i in range(n)]


class AgentStream:
    """Reassembles the agent messages a client sends, chunk by chunk, with each message's
    size bounded before any of its body is buffered (`limit_of(type)` gives the bound).

    A message over its bound is fatal, except for the types `skippable(type)` names: those
    (a clipboard larger than the server takes) are read past without being kept, and come
    out as (type, None)."""

    def __init__(self, limit_of, skippable=lambda kind: False):
        self.limit_of, self.skippable = limit_of, skippable
        self._buf = bytearray()
        self._header = None
        self._skip = 0  # bytes of an oversized message still to read past

    def feed(self, chunk: bytes) -> list[tuple[int, bytes | None]]:
        """Complete (type, body) messages; raises ProtocolError for a bad or oversized one."""
        out = []
        if self._skip:
            dropped = min(self._skip, len(chunk))
            self._skip -= dropped
            chunk = chunk[dropped:]
            if not self._skip:
                out.append((self._header.type, None))
                self._header = None
        self._buf += chunk
        while True:
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                header = HEADER.unpack(bytes(self._buf[:HEADER_SIZE]))
                if header.protocol != PROTOCOL:
                    raise ProtocolError(f"agent protocol {header.protocol}")
                del self._buf[:HEADER_SIZE]
                self._header = header
                limit = self.limit_of(header.type)
                if header.size > limit:
                    if not self.skippable(header.type):
                        raise ProtocolError(f"agent message type {header.type} of {header.size} "
                                            f"bytes (at most {limit})")
                    dropped = min(header.size, len(self._buf))
                    del self._buf[:dropped]
                    self._skip = header.size - dropped
                    if self._skip:
                        break
                    out.append((header.type, None))
                    self._header = None
                    continue
            if len(self._buf) < self._header.size:
                break
            size = self._header.size
            out.append((self._header.type, bytes(self._buf[:size])))
            del self._buf[:size]
            self._header = None
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def chunks(message: bytes) -> list[bytes]:
    """One packed agent message as AGENT_DATA payloads."""
    return [message[i:i + MAX_CHUNK] for i in range(0, len(message), MAX_CHUNK)] or [b""]
