"""Data headers after the link (brief §2): full 18-byte or mini 6-byte, and sub-message lists."""

from __future__ import annotations

import struct
from typing import Callable

from .wire import ProtocolError

FULL_HEADER = struct.Struct("<QHII")  # serial, type, size, sub_list
MINI_HEADER = struct.Struct("<HI")  # type, size
SUB_LIST_COUNT = struct.Struct("<H")
SUB_LIST_OFFSET = struct.Struct("<I")
SUB_MESSAGE = struct.Struct("<HI")
MSG_LIST = 8  # SPICE_MSG_LIST: a body that is only a sub-message list (server -> client)
MAX_MESSAGE_SIZE = 64 << 20  # a body above this is an attack or a bug, not a frame


class MessageReader:
    """Splits a byte stream into (type, body) messages.

    `feed(data)` returns every message completed by `data`, sub-messages first (spice-gtk
    order). A body larger than `max_size` raises ProtocolError before it is buffered.
    """

    def __init__(self, mini: bool, max_size: int = MAX_MESSAGE_SIZE, expand_list: bool = False,
                 body_limit: Callable[[int], int] | None = None):
        self.mini = mini
        self.max_size = max_size
        self.body_limit = body_limit  # per message type, checked before the body is buffered
        self.expand_list = expand_list
        self._header = MINI_HEADER if mini else FULL_HEADER
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        hsize = self._header.size
        pos = 0
        while len(self._buf) - pos >= hsize:
            if self.mini:
                type_id, size = self._header.unpack_from(self._buf, pos)
                sub_list = 0
            else:
                _, type_id, size, sub_list = self._header.unpack_from(self._buf, pos)
            if size > self.max_size or (self.body_limit is not None and size > self.body_limit(type_id)):
                raise ProtocolError(f"message type {type_id} of {size} bytes exceeds the limit")
            end = pos + hsize + size
            if end > len(self._buf):
                break
            body = bytes(self._buf[pos + hsize : end])
            pos = end
            if sub_list:
                subs = split_sub_messages(body, sub_list)
                if self.body_limit is not None:
                    for sub_type, sub_body in subs:
                        if len(sub_body) > self.body_limit(sub_type):
                            raise ProtocolError(f"sub-message type {sub_type} of {len(sub_body)} bytes "
                                                "exceeds the limit")
                out.extend(subs)
            if self.expand_list and type_id == MSG_LIST:
                out.extend(split_sub_messages(body, 0))
            else:
                out.append((type_id, body))
        if pos:
            del self._buf[:pos]
        return out


def split_sub_messages(body: bytes, offset: int) -> list[tuple[int, bytes]]:
    """Decode the SpiceSubMessageList at `offset` of `body` into (type, body) pairs.

    Sub-messages are parts of the body, so together they can never be bigger than it: a list
    that points many times at the same part (an amplification attack: a 1 MiB message
    expanding to gigabytes) is refused before anything is copied."""
    try:
        (count,) = SUB_LIST_COUNT.unpack_from(body, offset)
        spans = []
        total = 0
        for i in range(count):
            (sub,) = SUB_LIST_OFFSET.unpack_from(body, offset + 2 + 4 * i)
            type_id, size = SUB_MESSAGE.unpack_from(body, sub)
            start = sub + SUB_MESSAGE.size
            if start + size > len(body):
                raise ProtocolError("sub-message does not fit its list")
            total += SUB_MESSAGE.size + size
            if total > len(body):
                raise ProtocolError("sub-messages add up to more than their message")
            spans.append((type_id, start, size))
        return [(type_id, body[start : start + size]) for type_id, start, size in spans]
    except struct.error as exc:
        raise ProtocolError(f"truncated sub-message list: {exc}") from None


class MessageWriter:
    """Builds data headers; counts serials for the full header (both sides start at 1)."""

    def __init__(self, mini: bool):
        self.mini = mini
        self.serial = 0

    def header(self, type_id: int, size: int) -> bytes:
        self.serial += 1
        if self.mini:
            return MINI_HEADER.pack(type_id, size)
        return FULL_HEADER.pack(self.serial, type_id, size, 0)
