"""Every message declaration round-trips, in both directions, through its derived codec."""

import random

import pytest

from spicestream.protocol.framing import MessageReader, MessageWriter, split_sub_messages
from spicestream.protocol.messages import CLIENT, SERVER, Direction
from spicestream.protocol.wire import (
    Array, Blob, Clip, Pointer, ProtocolError, Record, Rect, Rest, Scalar)


def sample(field, rng):
    if isinstance(field, Scalar):
        code = field.struct.format[-1]
        bits = field.size * 8
        if code.islower():  # signed
            return rng.randint(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        return rng.randint(0, (1 << bits) - 1)
    if isinstance(field, Record):
        return field.type(*(sample(Scalar(c), rng) for c in field.struct.format[1:]))
    if isinstance(field, Array):
        return tuple(sample(field.element, rng) for _ in range(rng.randint(0, 3)))
    if isinstance(field, Blob):
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 9)))
    if isinstance(field, Rest):
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 9)))
    if isinstance(field, Clip):
        return rng.choice([None, (), (Rect(1, 2, 3, 4), Rect(-5, 6, 7, 8))])
    if isinstance(field, Pointer):
        return 0
    raise AssertionError(field)


def all_layouts():
    for side, direction in (("server", SERVER), ("client", CLIENT)):
        for layout in direction.layouts():
            yield pytest.param(direction, layout, id=f"{side}-{layout.name}")


@pytest.mark.parametrize("direction,layout", list(all_layouts()))
def test_round_trip(direction: Direction, layout):
    rng = random.Random(layout.name)
    for _ in range(20):
        value = layout.type(*(sample(f, rng) for _, f in layout.fields))
        type_id, body = direction.encode(value)
        assert type_id == layout.type.type_id
        channel = layout.type.channel or 1
        decoded = direction.decode(channel, type_id, body)
        for (name, field), want, got in zip(layout.fields, value, decoded):
            if isinstance(field, Pointer):
                # A pointer decodes to the offset of its target (the trailing payload).
                assert layout.fields[-1][0] == field.target
                assert got == len(body) - len(getattr(value, field.target))
            else:
                assert got == want, name
        # Every strict prefix of a body with fixed-size tail is a protocol error, never a crash.
        for cut in range(len(body)):
            try:
                direction.decode(channel, type_id, body[:cut])
            except ProtocolError:
                pass


def test_draw_copy_image_offset_matches_brief():
    # Brief §5.8: with clip NONE the image starts at offset 57 of the body.
    m = SERVER.DISPLAY_DRAW_COPY(0, Rect(0, 0, 768, 1024), None, 0, Rect(0, 0, 768, 1024),
                                 8, 0, 0, (0, 0), 0, b"IMAGE")
    _, body = SERVER.encode(m)
    assert body[21:25] == (57).to_bytes(4, "little")
    assert body[57:] == b"IMAGE" and len(body) == 62


def test_known_layouts_match_brief_sizes():
    sizes = {
        "MAIN_INIT": 32, "DISPLAY_SURFACE_CREATE": 20, "DISPLAY_STREAM_ACTIVATE_REPORT": 16,
        "SET_ACK": 8, "DISCONNECTING": 12, "DISPLAY_GL_SCANOUT_UNIX": 20, "DISPLAY_GL_DRAW": 16,
    }
    for name, size in sizes.items():
        layout = SERVER._layout_of[getattr(SERVER, name)]
        value = layout.type(*(0 for _ in layout.fields))
        assert len(SERVER.encode(value)[1]) == size, name
    report = CLIENT.DISPLAY_STREAM_REPORT(*range(8))
    assert len(CLIENT.encode(report)[1]) == 32
    assert len(CLIENT.encode(CLIENT.DISPLAY_INIT(1, 2, 3, 4))[1]) == 14
    assert len(CLIENT.encode(CLIENT.INPUTS_MOUSE_POSITION(1, 2, 3, 0))[1]) == 11


def test_unknown_types_decode_to_none_and_trailing_bytes_are_tolerated():
    assert CLIENT.decode(2, 999, b"xyz") is None
    assert CLIENT.decode(77, 101, b"xyz") is None  # unknown channel type
    m = CLIENT.decode(3, 111, b"\x01\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00")  # html5's 11 bytes
    assert (m.dx, m.dy, m.buttons_state) == (1, 2, 3)


@pytest.mark.parametrize("mini", [True, False])
def test_framing_round_trip_byte_by_byte(mini):
    writer, reader = MessageWriter(mini), MessageReader(mini)
    stream = b"".join(writer.header(t, len(b)) + b for t, b in [(101, b"abc"), (2, b""), (300, b"x" * 1000)])
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == [(101, b"abc"), (2, b""), (300, b"x" * 1000)]
    if not mini:
        assert writer.serial == 3


def test_framing_rejects_oversized_before_buffering():
    reader = MessageReader(True, max_size=1000)
    with pytest.raises(ProtocolError):
        reader.feed(MessageWriter(True).header(101, 1001))


def test_sub_message_list():
    subs = [(103, b"one"), (104, b"")]
    body = bytearray(b"\x00" * 4)
    offsets = []
    for t, b in subs:
        offsets.append(len(body))
        body += t.to_bytes(2, "little") + len(b).to_bytes(4, "little") + b
    list_at = len(body)
    body += len(subs).to_bytes(2, "little") + b"".join(o.to_bytes(4, "little") for o in offsets)
    assert split_sub_messages(bytes(body), list_at) == subs
    # A full header with sub_list set yields the sub-messages first.
    import struct
    frame = struct.pack("<QHII", 1, 102, len(body), list_at) + bytes(body)
    assert MessageReader(False).feed(frame) == subs + [(102, bytes(body))]
    with pytest.raises(ProtocolError):
        split_sub_messages(bytes(body[:-2]), list_at)


def test_every_client_message_has_a_body_limit():
    """Variable-sized client messages need an explicit limit (CLIENT_BODY_LIMITS); a new one
    added to the table without it fails here, not on a client's first message."""
    for layout in CLIENT.layouts():
        limit = CLIENT.body_limit(layout.type.channel or 1, layout.type.type_id)
        assert 0 < limit <= 64 << 10, (layout.name, limit)


def test_records_anywhere_in_the_fixed_part_pack_flat():
    """No declared message has two records in its fixed part yet; the packer flattens any
    number of them, where they stand, into the one struct."""
    import struct

    from spicestream.protocol.wire import Layout, Point, u32

    layout = Layout("TWO_RECORDS", [("a", u32), ("r", Rect), ("b", u32), ("p", Point)])
    value = layout.type(1, Rect(2, -3, 4, 5), 6, Point(-7, 8))
    assert layout.pack(value) == struct.pack("<IiiiiIii", 1, 2, -3, 4, 5, 6, -7, 8)
    assert layout.unpack(layout.pack(value)) == value
