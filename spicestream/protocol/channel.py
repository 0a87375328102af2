"""One linked channel, sans-IO: framing, base messages and the ACK window (brief §2, §3).

    conn = ChannelProtocol(channel_type, mini_header=True)
    conn.receive_data(data) -> decoded client messages for the channel's own logic
                               (ACK, ACK_SYNC and PONG are consumed here)
    conn.send(message)      -> queues the encoded message
    conn.data_to_send()     -> list of bytes-like parts, ready for writelines()
    conn.can_send           -> False while more than 2 x window messages are unacknowledged

Raises ProtocolError for oversized or truncated messages; unknown types are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .framing import MessageReader, MessageWriter
from .messages import CLIENT, SERVER, Direction

ACK_WINDOW = 20  # spice-server's NARROW window (brief §3.1)


@dataclass
class AckWindow:
    """Counts messages sent since SET_ACK; each ACK of the current generation frees `window`."""

    window: int = ACK_WINDOW
    generation: int = 0
    client_generation: int = -1
    unacked: int = 0
    received: int = 0  # client side: messages counted since SET_ACK

    @property
    def active(self) -> bool:
        return self.generation > 0

    @property
    def open(self) -> bool:  # read per frame: `active` spelt out
        return self.generation <= 0 or self.unacked <= 2 * self.window

    def sent(self, count: int = 1) -> None:
        if self.generation > 0:  # active
            self.unacked += count

    def ack(self) -> None:
        if self.client_generation == self.generation:
            self.unacked = max(0, self.unacked - self.window)

    def sync(self, generation: int) -> None:
        self.client_generation = generation


class ChannelProtocol:
    """Base-message handling shared by every channel; `side` picks the direction we speak."""

    def __init__(self, channel_type: int, mini_header: bool, side: str = "server",
                 max_message_size: int | None = None):
        self.channel_type = channel_type
        self.outgoing: Direction = SERVER if side == "server" else CLIENT
        self.incoming: Direction = CLIENT if side == "server" else SERVER
        kwargs = {} if max_message_size is None else {"max_size": max_message_size}
        if side == "server":  # what a client may send us is bounded type by type
            kwargs["body_limit"] = lambda type_id: self.incoming.body_limit(channel_type, type_id)
        self._reader = MessageReader(mini_header, expand_list=side == "client", **kwargs)
        self._writer = MessageWriter(mini_header)
        self._out: list = []
        self.acks = AckWindow()
        self.last_roundtrip_ms: float | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.skipped = 0

    # -- output -------------------------------------------------------------------------
    def send(self, message) -> int:
        """Queue a message; returns the number of body bytes."""
        type_id, parts = self.outgoing.encode_parts(message)
        size = sum(map(len, parts))
        self._out.append(self._writer.header(type_id, size))
        self._out.extend(parts)
        self.messages_out += 1
        self.acks.sent()
        return size

    def set_ack(self, window: int = ACK_WINDOW) -> None:
        self.acks = AckWindow(window=window, generation=self.acks.generation + 1)
        self.send(SERVER.SET_ACK(self.acks.generation, window))

    def ping(self, ping_id: int) -> None:
        self.send(SERVER.PING(ping_id, time.monotonic_ns(), b""))

    @property
    def can_send(self) -> bool:
        return self.acks.open

    def data_to_send(self) -> list:
        out, self._out = self._out, []
        return out

    # -- input --------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        events = []
        for type_id, body in self._reader.feed(data):
            self.messages_in += 1
            message = self.incoming.decode(self.channel_type, type_id, body)
            if message is None:
                self.skipped += 1
            elif not self._handle_base(message):
                events.append(message)
        return events

    def _handle_base(self, message) -> bool:
        kind = type(message)
        if self.outgoing is SERVER:
            if kind is CLIENT.ACK_SYNC:
                self.acks.sync(message.generation)
            elif kind is CLIENT.ACK:
                self.acks.ack()
            elif kind is CLIENT.PONG:
                self.last_roundtrip_ms = (time.monotonic_ns() - message.timestamp) / 1e6
            elif kind in (CLIENT.DISCONNECTING, CLIENT.MIGRATE_FLUSH_MARK, CLIENT.MIGRATE_DATA):
                pass
            else:
                return False
            return True
        # Client side (test client): answer the server's flow control like spice-gtk does.
        if kind is SERVER.SET_ACK:
            self.acks = AckWindow(window=message.window, generation=message.generation)
            self.send(CLIENT.ACK_SYNC(message.generation))
        elif kind is SERVER.PING:
            self.send(CLIENT.PONG(message.id, message.timestamp))
        elif kind in (SERVER.NOTIFY, SERVER.DISCONNECTING, SERVER.WAIT_FOR_CHANNELS,
                      SERVER.MIGRATE):
            pass
        else:
            self._count_for_ack()
            return False
        self._count_for_ack(kind is SERVER.SET_ACK)
        return True

    def _count_for_ack(self, is_set_ack: bool = False) -> None:
        # spice-gtk counts every message after SET_ACK and sends ACK every `window` of them.
        if is_set_ack or not self.acks.active or self.acks.window <= 0:
            return  # a zero window means "never ack", not a division by zero
        self.acks.received += 1
        if self.acks.received % self.acks.window == 0:
            self.send(CLIENT.ACK())
