"""Fuzzing: the sans-IO protocol pieces directly, then a real server over loopback TCP.

Sans-IO (hypothesis, no sockets): `ServerLink.receive_data` and `ChannelProtocol.receive_data`
only ever raise `ProtocolError`, whatever bytes arrive and however they are chunked.

Over TCP (seeded `random.Random`, so every run sends the same bytes):
  * thousands of malformed link messages, each on its own connection, checked against a small
    model of the link rules (which reply, or none);
  * post-link garbage on properly linked main/display/inputs/cursor channels: random
    well-framed messages of random types and bodies, fatal messages, raw random bytes. The
    expected fate of each connection is computed by feeding the same bytes to a fresh
    `ChannelProtocol` (the server must then have processed exactly as many messages, or have
    closed the connection with one log line).
Meanwhile a well-behaved TestClient stays connected and keeps receiving the application's
frame updates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import struct
import threading
import time
import types

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import spicestream
from helpers import FakeConnection, fresh_source
import spicestream.protocol.link as link_mod
from spicestream.protocol.channel import ChannelProtocol
from spicestream.protocol.constants import MAGIC, ChannelType, CommonCap, LinkError
from spicestream.protocol.framing import MAX_MESSAGE_SIZE
from spicestream.protocol.link import (
    LINK_HEADER,
    LINK_MESS,
    LINK_REPLY,
    ClientLink,
    LinkFailed,
    LinkRequested,
    ServerLink,
    TicketReceived,
    encrypt_ticket,
)
from spicestream.protocol.messages import CLIENT, SERVER
from spicestream.protocol.wire import Array, Blob, Pointer, ProtocolError, Record, Rest, Scalar
from spicestream.display.surface import Display
from spicestream.server.agent import Agent
from spicestream.server.core import ServerCore
from spicestream.testing.client import TestClient

HOST = "127.0.0.1"
PASSWORD = "fuzz-pw"
W, H = 64, 48
SERVED = {(int(t), 0) for t in (ChannelType.MAIN, ChannelType.DISPLAY, ChannelType.INPUTS,
                                ChannelType.CURSOR, ChannelType.PLAYBACK, ChannelType.RECORD)}
CHANNELS = [ChannelType.MAIN, ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR]
FUZZ_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much])
# Structured inputs come from a seeded random.Random (a failure prints its seed; hypothesis's
# own byte-level draws would overrun its buffer on multi-kilobyte streams). Raw inputs are
# hypothesis binaries, which shrink.
SEEDS = st.integers(0, 2**64 - 1).map(random.Random)
INTERESTING_U32 = [0, 1, 2, 3, 4, 8, 17, 18, 19, 22, 178, 1023, 1024, 1025, 4095, 4096, 4097,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


# =================================================================================================
# Message material shared by the sans-IO and the TCP fuzzers
# =================================================================================================
def _layouts_for(channel_type: int):
    out = []
    for layout in CLIENT.layouts():
        ch = layout.type.channel
        if ch is None or int(ch) == channel_type:
            out.append(layout)
    return out


LAYOUTS = {int(t): _layouts_for(int(t)) for t in CHANNELS}
KNOWN_TYPES = sorted({lay.type.type_id for lays in LAYOUTS.values() for lay in lays})


def sample_value(field, rng: random.Random):
    if isinstance(field, Scalar):
        code, bits = field.struct.format[-1], field.size * 8
        if rng.random() < 0.3:
            return rng.choice([0, 1, (1 << (bits - 1)) - 1] + ([-1, -(1 << (bits - 1))]
                                                               if code.islower() else [(1 << bits) - 1]))
        if code.islower():
            return rng.randint(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        return rng.randint(0, (1 << bits) - 1)
    if isinstance(field, Record):
        return field.type(*(sample_value(Scalar(c), rng) for c in field.struct.format[1:]))
    if isinstance(field, Array):
        return tuple(sample_value(field.element, rng) for _ in range(rng.randint(0, 6)))
    if isinstance(field, (Blob, Rest)):
        return rng.randbytes(rng.choice([0, 1, 2, 4, rng.randint(0, 40)]))
    if isinstance(field, Pointer):
        return 0
    raise AssertionError(f"no sampler for {field!r}")


def encoded_message(layout, rng: random.Random) -> tuple[int, bytes]:
    """A correctly encoded client message with random field values (plus tolerated tail)."""
    value = layout.type(*(sample_value(f, rng) for _, f in layout.fields))
    type_id, body = CLIENT.encode(value)
    if rng.random() < 0.2:
        body += rng.randbytes(rng.randint(1, 5))  # trailing bytes are tolerated (brief §0)
    return type_id, body


def frame(mini: bool, type_id: int, body: bytes, size: int | None = None, sub_list: int = 0,
          serial: int = 1) -> bytes:
    size = len(body) if size is None else size
    if mini:
        return struct.pack("<HI", type_id, size) + body
    return struct.pack("<QHII", serial, type_id, size, sub_list) + body


def with_sub_list(rng: random.Random, main: bytes, subs: list[tuple[int, bytes]]) -> tuple[bytes, int]:
    """A body holding `main` then sub-messages then a SpiceSubMessageList; returns (body, offset)."""
    body = bytearray(main)
    offsets = []
    for type_id, sub in subs:
        offsets.append(len(body))
        body += struct.pack("<HI", type_id, len(sub)) + sub
    list_at = len(body)
    body += struct.pack(f"<H{len(offsets)}I", len(offsets), *offsets)
    return bytes(body), list_at


def random_frame(rng: random.Random, channel_type: int, mini: bool) -> bytes:
    """One framed message, of any kind: mostly well-encoded known types, some junk."""
    roll = rng.random()
    layouts = LAYOUTS.get(channel_type) or LAYOUTS[int(ChannelType.MAIN)]
    if roll < 0.70:
        type_id, body = encoded_message(rng.choice(layouts), rng)
    elif roll < 0.80:  # a known type with a random body (often truncated)
        type_id, body = rng.choice(KNOWN_TYPES), rng.randbytes(rng.randint(0, 24))
    elif roll < 0.92:  # any type at all
        type_id = rng.choice([0, 7, 50, 99, 100, 150, 300, 1000, 0xFFFF, rng.randrange(0x10000)])
        body = rng.randbytes(rng.choice([0, 1, 3, rng.randint(0, 64), rng.randint(0, 3000)]))
    else:  # full header only: a sub-message list (valid or not)
        type_id, body = rng.choice(KNOWN_TYPES + [rng.randrange(0x10000)]), rng.randbytes(rng.randint(0, 8))
        if not mini:
            subs = [encoded_message(rng.choice(layouts), rng) if rng.random() < 0.8 else
                    (rng.randrange(0x10000), rng.randbytes(rng.randint(0, 12)))
                    for _ in range(rng.randint(0, 4))]
            body, list_at = with_sub_list(rng, body, subs)
            sub_list = list_at if rng.random() < 0.8 else rng.randrange(len(body) + 20)
            return frame(mini, type_id, body, sub_list=sub_list, serial=rng.randrange(1 << 64))
    if rng.random() < 0.03:  # lie about the size (oversized, or swallowing what follows)
        size = rng.choice([MAX_MESSAGE_SIZE + 1, 0xFFFFFFFF, len(body) + rng.randint(1, 100)])
        return frame(mini, type_id, body, size=size)
    return frame(mini, type_id, body, serial=rng.randrange(1 << 64))


def agent_oracle():
    """The main channel's agent as the server runs it, on a core of its own: which agent
    traffic is fatal depends on what came before (chunks, transfers), so the oracle replays
    it through the real Agent rather than a second model of it."""
    core = ServerCore(Display(64, 64), None, "fuzz")
    return Agent(core, FakeConnection("fuzz oracle"), "fuzz")


def outcome(channel_type: int, mini: bool, data: bytes) -> tuple[bool, int, int]:
    """What a server-side ChannelProtocol makes of `data` (and, on main, the agent):
    (fatal, messages_in, buffered)."""
    proto = ChannelProtocol(channel_type, mini)
    try:
        messages = proto.receive_data(data)
        if channel_type == ChannelType.MAIN:
            agent = None
            for message in messages:
                kind = type(message)
                if kind in (CLIENT.MAIN_AGENT_START, CLIENT.MAIN_AGENT_DATA, CLIENT.MAIN_AGENT_TOKEN):
                    agent = agent or agent_oracle()
                    if kind is CLIENT.MAIN_AGENT_START:
                        agent.start(message.num_tokens)
                    elif kind is CLIENT.MAIN_AGENT_DATA:
                        agent.data(message.data)
                    else:
                        agent.token(message.num_tokens)
    except ProtocolError:
        return True, proto.messages_in, 0
    return False, proto.messages_in, proto._reader.buffered


# =================================================================================================
# Sans-IO fuzzing
# =================================================================================================
_FAST_KEY = None


@contextlib.contextmanager
def fast_link_keys():
    """Reuse one RSA key in the link module (a fresh key per example would cost ~10-50 ms)."""
    global _FAST_KEY
    if _FAST_KEY is None:
        _FAST_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    original = link_mod.rsa
    link_mod.rsa = types.SimpleNamespace(generate_private_key=lambda **_: _FAST_KEY,
                                         RSAPrivateKey=rsa.RSAPrivateKey)
    try:
        yield
    finally:
        link_mod.rsa = original


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and b:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # random byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2 and len(b) >= 4:  # an interesting u32 at a field boundary
            i = rng.choice([0, 4, 8, 12, 16, 22, 26, 30] + [rng.randrange(len(b) - 3)])
            if i + 4 <= len(b):
                b[i : i + 4] = struct.pack("<I", rng.choice(INTERESTING_U32 + [rng.randrange(1 << 32)]))
        elif op == 3:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op == 4:  # append
            b += rng.randbytes(rng.randint(1, 40))
        elif op == 5:  # insert
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif b:  # delete a range
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 8)]
    return bytes(b)


def valid_hello(rng: random.Random) -> bytes:
    channel_type = rng.choice([1, 1, 2, 3, 4, rng.randrange(256)])
    channel_id = rng.choice([0, 0, 0, 1, rng.randrange(256)])
    common = rng.sample([0, 1, 2, 3, 31, 32, 40], rng.randint(0, 4))
    channel = rng.sample(range(100), rng.randint(0, 5))
    return ClientLink(rng.randrange(1 << 32) if rng.random() < 0.5 else 0, channel_type,
                      channel_id, channel, common).hello


def split(rng: random.Random, data: bytes, max_parts: int = 6) -> list[bytes]:
    if not data:
        return [b""]
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, max_parts - 1)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


@settings(max_examples=1500, **FUZZ_SETTINGS)
@given(SEEDS, st.binary(max_size=300), st.data())
def _server_link_fuzz(rng, raw, data):
    kind = data.draw(st.sampled_from(["raw", "mutated", "valid"]))
    if kind == "raw":
        stream = raw
    else:
        stream = valid_hello(rng)
        if kind == "mutated":
            stream = mutate(rng, stream)
        stream += raw[: data.draw(st.integers(0, len(raw)))]
    link = ServerLink()
    seen = collections.Counter()
    followed_up = False
    chunks = split(rng, stream)
    while chunks:
        events = link.receive_data(chunks.pop(0))  # any exception but ProtocolError fails
        assert isinstance(events, list)
        for ev in events:
            seen[type(ev)] += 1
            assert type(ev) in (LinkRequested, TicketReceived, LinkFailed)
            event_name = type(ev).__name__
            if isinstance(ev, LinkFailed):
                event_name += f" {ev.error.name}"
            elif isinstance(ev, TicketReceived):
                event_name += " (decrypted)" if ev.password is not None else " (garbage)"
            event(event_name)
            if isinstance(ev, LinkRequested):
                assert (ev.channel_type, ev.channel_id) == (stream[20], stream[21])
                if data.draw(st.booleans()):
                    link.accept(rng.sample(range(40), rng.randint(0, 3)))
                    out = link.data_to_send()
                    header, body = out[: LINK_HEADER.size], out[LINK_HEADER.size :]
                    error, pub, _, _ = ClientLink.parse_reply(header, body)
                    assert error == LinkError.OK and len(pub) == 162
                    if not followed_up and data.draw(st.booleans()):
                        # Answer like a client would, with a real or a garbage ticket.
                        followed_up = True
                        password = data.draw(st.sampled_from([b"", b"pw", b"x" * 60]))
                        ticket = encrypt_ticket(pub, password) if data.draw(st.booleans()) \
                            else rng.randbytes(128)
                        follow = struct.pack("<I", data.draw(st.sampled_from([1, 1, 1, 0, 2]))) + ticket
                        chunks.extend(split(rng, follow + rng.randbytes(rng.randint(0, 10))))
                else:
                    error = data.draw(st.sampled_from(list(LinkError)[1:]))
                    link.reject(error)
                    out = link.data_to_send()
                    assert len(out) == LINK_HEADER.size + LINK_REPLY.size
                    assert ClientLink.parse_reply(out[:16], out[16:])[0] == error
            elif isinstance(ev, TicketReceived):
                assert ev.password is None or isinstance(ev.password, bytes)
                error = data.draw(st.sampled_from([LinkError.OK, LinkError.PERMISSION_DENIED]))
                link.finish(error)
                assert link.data_to_send() == struct.pack("<I", error)
                assert link.done == (error == LinkError.OK)
            else:
                out = link.data_to_send()
                if len(out) == 4:
                    assert struct.unpack("<I", out)[0] == ev.error
                else:
                    assert len(out) == LINK_HEADER.size + LINK_REPLY.size
                    assert ClientLink.parse_reply(out[:16], out[16:])[0] == ev.error
                assert link.receive_data(rng.randbytes(50)) == []  # closed for good
        assert all(n <= 1 for n in seen.values()), seen


def test_server_link_only_raises_protocol_error():
    with fast_link_keys():
        _server_link_fuzz()


@settings(max_examples=1500, **FUZZ_SETTINGS)
@given(SEEDS,
       st.sampled_from([1, 2, 3, 4, 0, 5, 11, 200]), st.booleans(),
       st.one_of(st.binary(max_size=400), st.just(None)))
def _channel_protocol_fuzz(rng, channel_type, mini, raw):
    if raw is None:
        raw = b"".join(random_frame(rng, channel_type, mini) for _ in range(rng.randint(1, 12)))
    proto = ChannelProtocol(channel_type, mini)
    try:
        for chunk in split(rng, raw, 8):
            for message in proto.receive_data(chunk):
                assert type(message).__name__ in CLIENT.names.__dict__
    except ProtocolError:
        pass


def test_channel_protocol_only_raises_protocol_error():
    _channel_protocol_fuzz()


@settings(max_examples=500, **FUZZ_SETTINGS)
@given(SEEDS, st.sampled_from([1, 2, 3, 4]), st.booleans())
def _chunking_invariance(rng, channel_type, mini):
    # The TCP fuzzer relies on this: the outcome does not depend on how bytes are segmented.
    raw = b"".join(random_frame(rng, channel_type, mini) for _ in range(rng.randint(1, 10)))
    whole = ChannelProtocol(channel_type, mini)
    try:
        expected, whole_error = whole.receive_data(raw), False
    except ProtocolError:
        expected, whole_error = None, True
    parts = ChannelProtocol(channel_type, mini)
    got, parts_error = [], False
    try:
        for chunk in split(rng, raw, 20):
            got += parts.receive_data(chunk)
    except ProtocolError:
        parts_error = True
    assert parts_error == whole_error
    if not whole_error:
        assert got == expected
        assert parts.messages_in == whole.messages_in


def test_channel_protocol_chunking_invariance():
    _chunking_invariance()


SERVER_TYPES = sorted({lay.type.type_id for lay in SERVER.layouts()})


@settings(max_examples=800, **FUZZ_SETTINGS)
@given(SEEDS, st.sampled_from([1, 2, 3, 4]), st.booleans())
def _client_side_fuzz(rng, channel_type, mini):
    frames = []
    for _ in range(rng.randint(1, 10)):
        type_id = rng.choice(SERVER_TYPES) if rng.random() < 0.9 else rng.randrange(0x10000)
        frames.append(frame(mini, type_id, rng.randbytes(rng.randint(0, 60))))
    proto = ChannelProtocol(channel_type, mini, side="client")
    try:
        for chunk in split(rng, b"".join(frames), 8):
            proto.receive_data(chunk)
    except ProtocolError:
        pass


def test_client_side_channel_protocol_only_raises_protocol_error():
    _client_side_fuzz()


def test_client_side_set_ack_window_zero():
    proto = ChannelProtocol(ChannelType.DISPLAY, True, side="client")
    _, body = SERVER.encode(SERVER.SET_ACK(1, 0))
    _, mark = SERVER.encode(SERVER.DISPLAY_MARK())
    try:
        proto.receive_data(frame(True, 3, body) + frame(True, 102, mark))
    except ProtocolError:
        pass


# =================================================================================================
# TCP fuzzing against a running server
# =================================================================================================
@pytest.fixture(scope="module")
def server():
    srv = spicestream.Server(host=HOST, port=0, width=W, height=H, password=PASSWORD,
                             max_clients=64).start()  # many fuzzing sessions at once
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = TestClient(HOST, server.port, password=PASSWORD).connect()
    try:
        c.wait_for(lambda c: c.marked and c.frame is not None, 10, "first frame")
        yield c
    finally:
        c.close()


def same_picture(a, b) -> bool:
    return a is not None and a.shape == b.shape and np.array_equal(a[..., :3], b[..., :3])


class Animator:
    """The application: publishes a new frame every `period` seconds from its own thread."""

    def __init__(self, server, period: float = 0.02):
        self.server, self.period = server, period
        self.updates = 0
        self.last: np.ndarray | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(1234)
        while not self._stop.is_set():
            frame_ = np.zeros((H, W, 4), np.uint8)
            x, y = rng.integers(0, W - 8), rng.integers(0, H - 8)
            frame_[y : y + 8, x : x + 8, :3] = rng.integers(0, 256, 3, dtype=np.uint8)
            frame_[..., 0] = self.updates & 0xFF  # every update changes the whole picture
            frame_[..., 3] = 255
            self.server.display.update(frame_)
            self.last = frame_
            self.updates += 1
            self._stop.wait(self.period)

    def __enter__(self) -> "Animator":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def server_connections(server) -> dict:
    for _ in range(100):
        try:
            return {c.peer: c for c in list(server._core.connections)}
        except RuntimeError:  # the server thread changed the set while we copied it
            time.sleep(0.001)
    raise AssertionError("could not snapshot the server's connections")


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def log_lines(caplog, level=logging.WARNING) -> dict[str, list[str]]:
    by_peer = collections.defaultdict(list)
    for r in caplog.records:
        if r.name.startswith("spicestream") and r.levelno >= level:
            message = r.getMessage()
            by_peer[message.split(": ", 1)[0]].append(message)
    return by_peer


def assert_server_healthy(server, client, animator: Animator, draws_before: int, caplog) -> None:
    """Shared end-of-fuzz checks: updates flowed, the server lives, nobody leaked, no crashes."""
    assert client.draws > draws_before, "the good client got no updates while fuzzing"
    assert animator.updates > 10
    last = animator.last
    client.wait_for(lambda c: same_picture(c.frame, last), 10, "the last frame")
    assert server._thread is not None and server._thread.is_alive()
    assert not client.closed_channels
    errors = [r.getMessage() for r in caplog.records
              if r.name.startswith("spicestream") and r.levelno >= logging.ERROR]
    assert errors == [], errors[:5]
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    deadline = time.monotonic() + 10
    while len(server_connections(server)) != 4 or server.sessions != 1:  # the good client's
        assert time.monotonic() < deadline, (server_connections(server).keys(), server.sessions)
        time.sleep(0.01)
    with TestClient(HOST, server.port, password=PASSWORD) as fresh:
        fresh.wait_for(lambda c: same_picture(c.frame, server.display.frame), 10, "a fresh client")


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    try:
        while chunk := await reader.read(1 << 16):
            out += chunk
    except ConnectionError:  # reset, or a broken pipe reported by our own write
        pass
    return bytes(out)


# -- (a) malformed link messages ------------------------------------------------------------------
def expected_link_reply(data: bytes) -> LinkError | None:
    """The reply the link rules (brief §1.1, §1.2, §1.6) prescribe; None for 'wait for more'."""
    if len(data) < LINK_HEADER.size:
        return None
    magic, major, _minor, size = LINK_HEADER.unpack_from(data)
    if magic != MAGIC:
        return LinkError.INVALID_MAGIC
    if major != 2:
        return LinkError.VERSION_MISMATCH
    if not 18 <= size <= 4096:
        return LinkError.INVALID_DATA
    if len(data) < LINK_HEADER.size + size:
        return None
    _conn, ch_type, ch_id, n_common, n_channel, offset = LINK_MESS.unpack_from(data, LINK_HEADER.size)
    if n_common > 1024 or n_channel > 1024:
        return LinkError.INVALID_DATA
    if offset < 18 or offset + 4 * (n_common + n_channel) > size:
        return LinkError.INVALID_DATA
    if (ch_type, ch_id) not in SERVED:
        return LinkError.CHANNEL_NOT_AVAILABLE
    return LinkError.OK


def link_cases(seed: int, count: int, max_ok: int) -> list[bytes]:
    rng = random.Random(seed)
    cases, ok = [], 0
    while len(cases) < count:
        roll = rng.random()
        if roll < 0.20:
            data = rng.randbytes(rng.choice([0, 1, 15, 16, 17, rng.randint(0, 80)]))
        elif roll < 0.30:
            data = MAGIC + rng.randbytes(rng.randint(0, 60))
        elif roll < 0.45:
            data = (LINK_HEADER.pack(MAGIC, 2, rng.randrange(1 << 32),
                                     rng.choice(INTERESTING_U32 + [rng.randrange(1 << 32)]))
                    + rng.randbytes(rng.randint(0, 60)))
        else:
            data = mutate(rng, valid_hello(rng))
        if expected_link_reply(data) == LinkError.OK:
            if ok >= max_ok:  # links that reach the reply cost an RSA key each: ration them
                continue
            ok += 1
        cases.append(data)
    return cases


def check_link_response(data: bytes, response: bytes) -> LinkError | None:
    expected = expected_link_reply(data)
    if expected is None:
        assert response == b"", (data.hex(), response.hex())
        return None
    header, rest = response[: LINK_HEADER.size], response[LINK_HEADER.size :]
    assert len(header) == LINK_HEADER.size, (data.hex(), response.hex())
    size = LINK_HEADER.unpack(header)[3]
    error, pub, common, _ = ClientLink.parse_reply(header, rest[:size])
    assert error == expected, (data.hex(), error, expected)
    tail = rest[size:]
    if expected != LinkError.OK:
        assert size == LINK_REPLY.size and pub == bytes(162) and tail == b""
        return expected
    assert len(pub) == 162 and common
    # What follows the link message (if anything) is answered as soon as it is complete: a
    # wrong mechanism word is INVALID_DATA, a garbage ticket PERMISSION_DENIED.
    after = data[LINK_HEADER.size + struct.unpack_from("<I", data, 12)[0]:]
    expect_tail = b""
    if len(after) >= 4:
        mechanism = struct.unpack_from("<I", after)[0]
        if mechanism != 1:
            expect_tail = struct.pack("<I", LinkError.INVALID_DATA)
        elif len(after) >= 4 + 128:
            expect_tail = struct.pack("<I", LinkError.PERMISSION_DENIED)
    assert tail == expect_tail, (data.hex(), tail.hex())
    return expected


async def _send_link_case(port: int, data: bytes, sem: asyncio.Semaphore, results: list) -> None:
    async with sem:
        # Each from a network of its own: 3000 hellos from one would meet the hello limit.
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(fresh_source(), 0))
        try:
            name = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
            writer.write(data)  # one write: bytes the server never reads would provoke a RST
            await writer.drain()
            writer.write_eof()
            response = await asyncio.wait_for(read_to_eof(reader), 10)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        results.append((name, data, response))


def test_fuzz_link_messages(server, client, caplog):
    caplog.set_level(logging.INFO, logger="spicestream")
    cases = link_cases(seed=20240611, count=3000, max_ok=150)
    results: list = []
    draws_before = client.draws
    started = time.monotonic()

    async def main():
        sem = asyncio.Semaphore(48)
        await asyncio.gather(*(_send_link_case(server.port, d, sem, results) for d in cases))

    with Animator(server) as animator:
        asyncio.run(asyncio.wait_for(main(), 60))
    elapsed = time.monotonic() - started
    assert len(results) == len(cases)

    outcomes = collections.Counter()
    # A refused link logs exactly one line, one that gives up half-way logs nothing. Client
    # ports are reused over thousands of connections, so lines are counted per peer address.
    expected_lines: collections.Counter = collections.Counter()
    unknown = set()  # links that reached the reply: what follows is not pinned down
    for name, data, response in results:
        expected = check_link_response(data, response)
        outcomes[expected.name if expected is not None else "none"] += 1
        if expected == LinkError.OK:
            unknown.add(name)
        elif expected is not None:
            expected_lines[name] += 1
    for name, lines in log_lines(caplog).items():
        if name not in unknown:
            assert len(lines) == expected_lines[name], (name, lines)
            assert all("closing connection: " in line for line in lines), lines
    assert sum(expected_lines.values()) >= 1500
    # The mix really covers every refusal (and some links that reach the reply).
    for name_ in ("INVALID_MAGIC", "VERSION_MISMATCH", "INVALID_DATA", "CHANNEL_NOT_AVAILABLE",
                  "OK", "none"):
        assert outcomes[name_] >= 20, outcomes
    print(f"\nlink fuzz: {len(cases)} connections in {elapsed:.1f}s: {dict(outcomes)}")
    assert_server_healthy(server, client, animator, draws_before, caplog)


# -- (b) garbage after a successful link ----------------------------------------------------------
class FuzzChannel:
    def __init__(self, channel_type: int, mini: bool, reader, writer):
        self.channel_type, self.mini = channel_type, mini
        self.reader, self.writer = reader, writer
        self.name = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
        self.stream = b""
        self.fatal = False
        self.expected_in = 0
        self.frames = 0
        self.eof = asyncio.get_running_loop().create_future()
        self._drain = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            await read_to_eof(self.reader)  # throw away what the server sends
        finally:
            if not self.eof.done():
                self.eof.set_result(True)

    async def send(self, rng: random.Random) -> None:
        try:
            for chunk in split(rng, self.stream, 40):
                self.writer.write(chunk)
                await self.writer.drain()
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
        except ConnectionError:
            assert self.fatal  # only a connection we broke may be closed under us

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


async def open_channel(port: int, channel_type: int, connection_id: int, mini: bool):
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(fresh_source(), 0))
    common = (CommonCap.PROTOCOL_AUTH_SELECTION,) + ((CommonCap.MINI_HEADER,) if mini else ())
    writer.write(ClientLink(connection_id, channel_type, 0, (), common).hello)
    header = await reader.readexactly(LINK_HEADER.size)
    body = await reader.readexactly(LINK_HEADER.unpack(header)[3])
    error, pub, _, _ = ClientLink.parse_reply(header, body)
    assert error == LinkError.OK
    writer.write(ClientLink.ticket(pub, PASSWORD))
    assert await reader.readexactly(4) == struct.pack("<I", LinkError.OK)
    session_id = None
    if channel_type == ChannelType.MAIN:
        proto = ChannelProtocol(channel_type, mini, side="client")
        while session_id is None:
            chunk = await reader.read(1 << 16)
            assert chunk
            for message in proto.receive_data(chunk):
                if type(message) is SERVER.MAIN_INIT:
                    session_id = message.session_id
    return FuzzChannel(channel_type, mini, reader, writer), session_id


def fatal_frame(rng: random.Random, channel_type: int, mini: bool) -> bytes:
    while True:
        roll = rng.random()
        if roll < 0.6:  # a known message, cut short
            type_id, body = encoded_message(rng.choice(LAYOUTS[channel_type]), rng)
            candidate = frame(mini, type_id, body[: rng.randrange(len(body) + 1)])
        elif roll < 0.8 or mini:  # a body over the 64 MiB limit
            candidate = frame(mini, rng.choice(KNOWN_TYPES), b"",
                              size=rng.choice([MAX_MESSAGE_SIZE + 1, 0xFFFFFFFF]))
        else:  # a sub-message list pointing outside the body
            body = rng.randbytes(rng.randint(0, 10))
            candidate = frame(mini, rng.choice(KNOWN_TYPES), body,
                              sub_list=len(body) + rng.randint(0, 50))
        if outcome(channel_type, mini, candidate)[0]:
            return candidate


def plan(rng: random.Random, ch: FuzzChannel, mode: str) -> None:
    """Fill ch.stream and what the server must make of it (fatal / messages processed)."""
    frames = []
    # On main, agent chunks add up across frames: judge each candidate after all before it.
    cumulative = ch.channel_type == ChannelType.MAIN
    for _ in range(rng.randint(40, 160)):
        for _attempt in range(20):
            candidate = random_frame(rng, ch.channel_type, ch.mini)
            judged = b"".join(frames) + candidate if cumulative else candidate
            fatal, _, buffered = outcome(ch.channel_type, ch.mini, judged)
            if not fatal and buffered == 0:
                frames.append(candidate)
                break
    ch.frames = len(frames)
    stream = b"".join(frames)
    if mode == "fatal":
        stream += fatal_frame(rng, ch.channel_type, ch.mini)
    elif mode == "bytes":
        stream += rng.randbytes(rng.randint(1, 600))
    ch.stream = stream
    ch.fatal, ch.expected_in, _ = outcome(ch.channel_type, ch.mini, stream)


async def verify(server, ch: FuzzChannel) -> None:
    """After sending: a fatal stream got the connection closed; any other stream was processed
    message for message and the connection is still up."""
    if ch.fatal:
        await until(lambda: ch.name not in server_connections(server), 10, f"{ch.name} closed")
        await asyncio.wait_for(ch.eof, 10)
        return

    def processed():
        conn = server_connections(server).get(ch.name)
        assert conn is not None, f"{ch.name} was closed but its stream was not fatal"
        # The server writes the link result, then starts the channel (on its own thread): the
        # client can be here in between.
        return conn.proto is not None and conn.proto.messages_in == ch.expected_in

    await until(processed, 10, f"{ch.name} to process {ch.expected_in} messages")
    assert not ch.eof.done()


async def fuzz_session(server, index: int, seed: int, stats: collections.Counter) -> list:
    rng = random.Random(seed)
    mini = index % 2 == 0
    main, session_id = await open_channel(server.port, ChannelType.MAIN, 0, mini)
    others = [(await open_channel(server.port, t, session_id, mini))[0]
              for t in (ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR)]
    try:
        plan(rng, main, "clean")
        modes = [rng.choice(["clean", "clean", "fatal", "fatal", "bytes"]) for _ in others]
        for ch, mode in zip(others, modes):
            plan(rng, ch, mode)
        await asyncio.gather(*(ch.send(random.Random(rng.random())) for ch in [main] + others))
        await asyncio.gather(*(verify(server, ch) for ch in [main] + others))
        for ch in [main] + others:
            stats["channels"] += 1
            stats["fatal" if ch.fatal else "open"] += 1
            stats["messages"] += ch.frames
        # End the session: its main channel breaks the protocol, or goes away cleanly. Either
        # way the server closes the session's other channels.
        main_fatal = rng.random() < 0.5
        if main_fatal:
            main.stream, main.fatal = fatal_frame(rng, ChannelType.MAIN, mini), True
            await main.send(rng)
        else:
            await main.close()
        for ch in [main] + others:
            await until(lambda ch=ch: ch.name not in server_connections(server), 10,
                        f"{ch.name} closed with its session")
        return [(main, main_fatal)] + [(ch, ch.fatal) for ch in others]
    finally:
        for ch in [main] + others:
            await ch.close()


def test_fuzz_after_link(server, client, caplog):
    caplog.set_level(logging.INFO, logger="spicestream")
    keys, pointer = [], []
    server.on_key = lambda *a: keys.append(a)
    server.on_pointer = lambda *a: pointer.append(a)
    stats: collections.Counter = collections.Counter()
    draws_before = client.draws
    started = time.monotonic()

    async def main():
        sessions = await asyncio.gather(*(fuzz_session(server, i, 777 + i, stats) for i in range(20)))
        return [c for s in sessions for c in s]

    try:
        with Animator(server) as animator:
            channels = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.on_key = server.on_pointer = None
    elapsed = time.monotonic() - started
    print(f"\npost-link fuzz: {dict(stats)} in {elapsed:.1f}s; app saw {len(keys)} key events, "
          f"{len(pointer)} pointer events")
    assert stats["messages"] >= 2000 and stats["fatal"] >= 5 and stats["open"] >= 5, stats
    assert keys and pointer  # well-formed input messages reached the application

    # A broken connection logs exactly one warning saying why; the others none, and the
    # session's end closes them with an INFO line. (Counted per peer address: client ports
    # may be reused by a later connection.)
    want_warnings, want_ended = collections.Counter(), collections.Counter()
    for ch, fatal in channels:
        if fatal:
            want_warnings[ch.name] += 1
        elif ch.channel_type != ChannelType.MAIN:
            want_ended[ch.name] += 1
    warnings, infos = log_lines(caplog), log_lines(caplog, logging.INFO)
    for name in {ch.name for ch, _ in channels}:
        mine = warnings.get(name, [])
        assert len(mine) == want_warnings[name], (name, mine)
        assert all("closing connection: protocol error" in m for m in mine), mine
        ended = [m for m in infos.get(name, []) if "closing connection: main channel closed" in m]
        assert len(ended) == want_ended[name], (name, infos.get(name))
    assert_server_healthy(server, client, animator, draws_before, caplog)
