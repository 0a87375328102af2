"""The link stage (brief §1), sans-IO: bytes in, events out, bytes to send.

Server side, one `ServerLink` per connection:

    link.receive_data(data) -> list of events
      LinkRequested   -> caller checks the channel and calls accept(caps) or reject(error)
      TicketReceived  -> caller checks the password and calls finish(error)
      LinkFailed      -> the peer broke the link protocol; the error reply (if any) is
                         already queued; send it and close
    link.data_to_send() -> bytes queued by accept/reject/finish
    link.leftover       -> bytes the peer sent after its ticket (start of the data stream)

`ClientLink` is the mirror image, used by the in-repo test client.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .constants import (
    MAGIC,
    MAJOR_VERSION,
    MINOR_VERSION,
    TICKET_CIPHER_BYTES,
    TICKET_PUBKEY_BYTES,
    CommonCap,
    LinkError,
    caps_to_words,
    has_cap,
)
from .wire import ProtocolError

LINK_HEADER = struct.Struct("<4sIII")
LINK_MESS = struct.Struct("<IBBIII")
LINK_REPLY = struct.Struct(f"<I{TICKET_PUBKEY_BYTES}sIII")
RESULT = struct.Struct("<I")
MAX_CAPS_WORDS = 1024
MIN_MESS_SIZE, MAX_MESS_SIZE = LINK_MESS.size, 4096
MISALIGNED_TICKET_SHIFTS = 2  # leading zero bytes re-added to a ticket (ServerLink._decrypt)
# Everything a peer may have buffered here before its link completes: a whole pipelined link
# (header, message, auth word, ticket: under 4.3 KiB) plus the start of its data stream. An
# unauthenticated peer never makes us hold more (the transport stops reading while a ticket
# is being answered).
MAX_PENDING_BYTES = 16 << 10
AUTH_SPICE = 1
OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
SERVER_COMMON_CAPS = (CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.AUTH_SPICE, CommonCap.MINI_HEADER)


@dataclass(frozen=True)
class LinkRequested:
    connection_id: int
    channel_type: int
    channel_id: int
    common_caps: tuple[int, ...]
    channel_caps: tuple[int, ...]


@dataclass(frozen=True)
class TicketReceived:
    password: bytes | None  # None when the ticket did not decrypt


@dataclass(frozen=True)
class LinkFailed:
    error: LinkError
    reason: str


class _State(enum.Enum):
    HEADER = 1
    MESS = 2
    DECIDING = 3
    AUTH = 4
    TICKET = 5
    CHECKING = 6
    DONE = 7
    CLOSED = 8


def encrypt_ticket(public_der: bytes, password: bytes) -> bytes:
    key = serialization.load_der_public_key(public_der)
    return key.encrypt(password + b"\x00", OAEP)


def new_link_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-1024 key, as spice-server makes one per link (~10 ms of CPU)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


class ServerLink:
    def __init__(self):
        self._state = _State.HEADER
        self._buf = bytearray()
        self._out = bytearray()
        self._need = LINK_HEADER.size
        self._key: rsa.RSAPrivateKey | None = None
        self.request: LinkRequested | None = None
        self.leftover = b""
        self.mini_header = False

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_data(self, data: bytes) -> list:
        if self._state in (_State.DONE, _State.CLOSED):
            return []
        if len(self._buf) + len(self.leftover) + len(data) > MAX_PENDING_BYTES:
            return [self._fail(LinkError.INVALID_DATA, "more than "
                               f"{MAX_PENDING_BYTES} bytes before the link completed", reply=False)]
        self._buf += data
        events = []
        while self._state in (_State.HEADER, _State.MESS, _State.AUTH, _State.TICKET):
            if len(self._buf) < self._need:
                break
            chunk = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            event = self._step(chunk)
            if event is not None:
                events.append(event)
        return events

    def _fail(self, error: LinkError, reason: str, reply: bool) -> LinkFailed:
        if reply:
            self._queue_reply(error)
        elif self._state in (_State.AUTH, _State.TICKET):
            self._out += RESULT.pack(error)
        self._state = _State.CLOSED
        return LinkFailed(error, reason)

    def _step(self, chunk: bytes):
        if self._state is _State.HEADER:
            magic, major, _minor, size = LINK_HEADER.unpack(chunk)
            if magic != MAGIC:
                return self._fail(LinkError.INVALID_MAGIC, f"bad magic {magic!r}", reply=True)
            if major != MAJOR_VERSION:
                return self._fail(LinkError.VERSION_MISMATCH, f"major version {major}", reply=True)
            if not MIN_MESS_SIZE <= size <= MAX_MESS_SIZE:
                return self._fail(LinkError.INVALID_DATA, f"link message size {size}", reply=True)
            self._state, self._need = _State.MESS, size
            return None
        if self._state is _State.MESS:
            return self._parse_mess(chunk)
        if self._state is _State.AUTH:
            (mechanism,) = RESULT.unpack(chunk)
            if mechanism != AUTH_SPICE:
                return self._fail(LinkError.INVALID_DATA, f"auth mechanism {mechanism}", reply=False)
            self._state, self._need = _State.TICKET, TICKET_CIPHER_BYTES
            return None
        # TICKET
        self._state = _State.CHECKING
        self.leftover = bytes(self._buf)
        self._buf.clear()
        plain = self._decrypt(chunk)
        return TicketReceived(None if plain is None else plain.split(b"\x00", 1)[0])

    def _decrypt(self, cipher: bytes) -> bytes | None:
        """spice-html5 writes the ciphertext's big number without its leading zero bytes,
        left-aligned and zero-filled at the end (ticket.js rsa_encrypt: one ticket in ~200):
        where a ticket fails to decrypt and ends in zeros, the number it meant is tried once
        or twice more. A guesser gains nothing: each try is a full OAEP check."""
        for shift in range(MISALIGNED_TICKET_SHIFTS + 1):
            if shift and cipher[-shift:] != bytes(shift):
                return None
            try:
                return self._key.decrypt(bytes(shift) + cipher[: len(cipher) - shift], OAEP)
            except ValueError:
                continue
        return None

    def _parse_mess(self, mess: bytes):
        conn_id, ch_type, ch_id, n_common, n_channel, caps_offset = LINK_MESS.unpack_from(mess)
        if n_common > MAX_CAPS_WORDS or n_channel > MAX_CAPS_WORDS:
            return self._fail(LinkError.INVALID_DATA, "too many caps", reply=True)
        caps_end = caps_offset + 4 * (n_common + n_channel)
        if caps_offset < LINK_MESS.size or caps_end > len(mess):
            return self._fail(LinkError.INVALID_DATA, "caps do not fit the link message", reply=True)
        words = struct.unpack_from(f"<{n_common + n_channel}I", mess, caps_offset)
        self.request = LinkRequested(conn_id, ch_type, ch_id, words[:n_common], words[n_common:])
        self._state = _State.DECIDING
        return self.request

    def _queue_reply(self, error: LinkError, pub: bytes = b"", channel_caps=()) -> None:
        common = caps_to_words(SERVER_COMMON_CAPS) if error == LinkError.OK else []
        channel = caps_to_words(channel_caps) if error == LinkError.OK else []
        caps = struct.pack(f"<{len(common) + len(channel)}I", *common, *channel)
        body = LINK_REPLY.pack(error, pub, len(common), len(channel), LINK_REPLY.size) + caps
        self._out += LINK_HEADER.pack(MAGIC, MAJOR_VERSION, MINOR_VERSION, len(body)) + body

    def accept(self, channel_caps=(), key: rsa.RSAPrivateKey | None = None) -> None:
        """Answer the link message with a fresh RSA-1024 key (`key`, made ahead of need by the
        caller; else generated here) and our caps."""
        assert self._state is _State.DECIDING
        self._key = key if key is not None else new_link_key()
        pub = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._queue_reply(LinkError.OK, pub, channel_caps)
        self.mini_header = has_cap(self.request.common_caps, CommonCap.MINI_HEADER)
        # We advertise AUTH_SELECTION, so the client sends a mechanism word first (brief §1.4).
        self._state, self._need = _State.AUTH, 4

    def reject(self, error: LinkError) -> None:
        """Refuse at the link-reply stage (e.g. NEED_SECURED, unknown channel)."""
        assert self._state is _State.DECIDING
        self._queue_reply(error)
        self._state = _State.CLOSED

    def finish(self, error: LinkError = LinkError.OK) -> None:
        """Send the link result; anything but OK ends the link."""
        assert self._state is _State.CHECKING
        self._out += RESULT.pack(error)
        self._state = _State.DONE if error == LinkError.OK else _State.CLOSED
        self.leftover += bytes(self._buf)  # what came while the ticket was being checked
        self._buf.clear()


class ClientLink:
    """Client side of the link, for tests: build the link message, answer the reply."""

    def __init__(self, connection_id: int, channel_type: int, channel_id: int,
                 channel_caps=(), common_caps=(CommonCap.PROTOCOL_AUTH_SELECTION,
                                                CommonCap.MINI_HEADER)):
        common, channel = caps_to_words(common_caps), caps_to_words(channel_caps)
        caps = struct.pack(f"<{len(common) + len(channel)}I", *common, *channel)
        mess = LINK_MESS.pack(connection_id, channel_type, channel_id, len(common),
                              len(channel), LINK_MESS.size) + caps
        self.hello = LINK_HEADER.pack(MAGIC, MAJOR_VERSION, MINOR_VERSION, len(mess)) + mess
        self.client_mini = CommonCap.MINI_HEADER in common_caps

    @staticmethod
    def parse_reply(header: bytes, body: bytes) -> tuple[LinkError, bytes, tuple, tuple]:
        magic, major, _minor, size = LINK_HEADER.unpack(header)
        if magic != MAGIC or major != MAJOR_VERSION or size != len(body) or size < LINK_REPLY.size:
            raise ProtocolError("bad link reply header")
        error, pub, n_common, n_channel, offset = LINK_REPLY.unpack_from(body)
        words = struct.unpack_from(f"<{n_common + n_channel}I", body, offset)
        return LinkError(error), pub, words[:n_common], words[n_common:]

    @staticmethod
    def ticket(pub: bytes, password: str | bytes | None) -> bytes:
        if isinstance(password, str):
            password = password.encode()
        return struct.pack("<I", AUTH_SPICE) + encrypt_ticket(pub, password or b"")
