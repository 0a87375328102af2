"""Field types that wire structures are declared with.

Every SPICE structure is little-endian and packed (protocol brief §0). A field type knows how
to pack a Python value and how to unpack one from a buffer at an offset; a message declaration
is just a list of named fields, and `Layout` derives both directions from it. Truncated input
raises `ProtocolError` (never `struct.error` or `IndexError`), so callers have one error to catch.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from typing import Any


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol (truncated, oversized or malformed)."""


class Scalar:
    """A fixed-size integer, packed with one `struct` code."""

    def __init__(self, code: str):
        self.struct = struct.Struct("<" + code)
        self.size = self.struct.size

    def pack(self, value: Any) -> bytes:
        return self.struct.pack(value)

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        end = offset + self.size
        if end > len(buf):
            raise ProtocolError(f"truncated: need {end} bytes, have {len(buf)}")
        return self.struct.unpack_from(buf, offset)[0], end


u8, u16, u32, u64 = Scalar("B"), Scalar("H"), Scalar("I"), Scalar("Q")
i16, i32, i64 = Scalar("h"), Scalar("i"), Scalar("q")


class Record:
    """A fixed-size structure of scalars, unpacked into a namedtuple (Rect, Point, ...)."""

    def __init__(self, name: str, fields: list[tuple[str, Scalar]]):
        self.type = namedtuple(name, [n for n, _ in fields])
        self.struct = struct.Struct("<" + "".join(s.struct.format[1:] for _, s in fields))
        self.size = self.struct.size

    def __call__(self, *args, **kwargs):
        return self.type(*args, **kwargs)

    def pack(self, value: Any) -> bytes:
        return self.struct.pack(*value)

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        end = offset + self.size
        if end > len(buf):
            raise ProtocolError(f"truncated: need {end} bytes, have {len(buf)}")
        return self.type._make(self.struct.unpack_from(buf, offset)), end


# Rect is top, left, bottom, right on the wire (brief §0), not x, y, w, h.
Rect = Record("Rect", [("top", i32), ("left", i32), ("bottom", i32), ("right", i32)])
Point = Record("Point", [("x", i32), ("y", i32)])
Point16 = Record("Point16", [("x", i16), ("y", i16)])


class Array:
    """A count (of type `count`) followed by that many elements; the value is a tuple."""

    def __init__(self, count: Scalar, element: Scalar | Record, limit: int = 1 << 16):
        self.count, self.element, self.limit = count, element, limit

    def pack(self, value: Any) -> bytes:
        return self.count.pack(len(value)) + b"".join(self.element.pack(v) for v in value)

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        n, offset = self.count.unpack(buf, offset)
        if n > self.limit or offset + n * self.element.size > len(buf):
            raise ProtocolError(f"array of {n} elements does not fit")
        items = []
        for _ in range(n):
            item, offset = self.element.unpack(buf, offset)
            items.append(item)
        return tuple(items), offset


class Blob:
    """A length (of type `length`) followed by that many bytes."""

    def __init__(self, length: Scalar):
        self.length = length

    def pack(self, value: Any) -> list:
        # The length, then the bytes as they are: an encoded frame reaches the socket
        # without a copy here.
        return [self.length.pack(len(value)), value if type(value) is bytes else bytes(value)]

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        n, offset = self.length.unpack(buf, offset)
        end = offset + n
        if end > len(buf):
            raise ProtocolError(f"blob of {n} bytes does not fit")
        return bytes(buf[offset:end]), end


class Rest:
    """All remaining bytes of the body. Packing accepts a bytes-like object or a list of
    them (passed through uncopied, so large pixel payloads reach the socket as they are)."""

    def pack(self, value: Any) -> Any:
        return value

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        return bytes(buf[offset:]), len(buf)


class Padding:
    """`n` reserved bytes: zeros when packed, skipped when unpacked (the value is None)."""

    def __init__(self, n: int):
        self.n = n

    def pack(self, value: Any) -> bytes:
        return bytes(self.n)

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        end = offset + self.n
        if end > len(buf):
            raise ProtocolError(f"truncated: need {end} bytes, have {len(buf)}")
        return None, end


class Clip:
    """Inline clip: u8 type (0 NONE, 1 RECTS) then, for RECTS, u32 n + n Rects.

    The value is None for NONE and a tuple of Rects for RECTS (an empty tuple means
    "nothing visible", which is not the same as None).
    """

    _rects = Array(u32, Rect, limit=4096)

    def pack(self, value: Any) -> bytes:
        if value is None:
            return b"\x00"
        return b"\x01" + self._rects.pack(value)

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        kind, offset = u8.unpack(buf, offset)
        if kind == 0:
            return None, offset
        if kind != 1:
            raise ProtocolError(f"unknown clip type {kind}")
        return self._rects.unpack(buf, offset)


class Pointer:
    """A u32 offset, counted from the start of the body, of the field named `target`.

    On packing, the value is ignored and the real offset is filled in (brief §0: pointers are
    offsets into the body; the pointed-to data is appended after the fixed part).
    """

    size = 4

    def __init__(self, target: str):
        self.target = target

    def unpack(self, buf: memoryview, offset: int) -> tuple[Any, int]:
        return u32.unpack(buf, offset)


class Layout:
    """An ordered list of named fields; packs a namedtuple to bytes and back."""

    def __init__(self, name: str, fields: list[tuple[str, Any]]):
        self.name = name
        self.fields = fields
        self.type = namedtuple(name, [n for n, _ in fields])
        # A leading run of scalars/records is packed with one precompiled Struct: it is the
        # whole message for most types, so the common case costs one struct call.
        run = []
        for _, f in fields:
            if isinstance(f, (Scalar, Record)):
                run.append(f)
            else:
                break
        self._fixed = len(run)
        # Where that run has records (a stream frame's dest Rect), last first: each is
        # flattened into the struct's values by one slice assignment, not a loop over fields.
        self._records_last_first = tuple(i for i in reversed(range(len(run))) if isinstance(run[i], Record))
        self._fixed_struct = struct.Struct("<" + "".join(f.struct.format[1:] for f in run))
        # The body size when every field is fixed-size, else None (arrays, blobs, the rest).
        self.fixed_size = self._fixed_struct.size if self._fixed == len(fields) else None
        # The fields after the run, when none is a pointer: packed one after the other.
        tail = fields[self._fixed :]
        self._plain_tail = None if any(isinstance(f, Pointer) for _, f in tail) else tuple(f for _, f in tail)

    def pack_parts(self, value: Any) -> list[Any]:
        """Pack to a list of bytes-like parts (large payloads are passed through uncopied)."""
        fixed = value[: self._fixed]
        if self._records_last_first:
            fixed = list(fixed)
            for i in self._records_last_first:  # last first: earlier indexes stay valid
                fixed[i : i + 1] = fixed[i]
        parts = [self._fixed_struct.pack(*fixed)]
        if self._plain_tail is not None:  # every message but DRAW_COPY: no offsets to fill
            for f, v in zip(self._plain_tail, value[self._fixed :]):
                packed = f.pack(v)
                if type(packed) is list:
                    parts.extend(packed)
                else:
                    parts.append(packed)
            return parts
        pos, offsets, patches = len(parts[0]), {}, []
        for (name, f), v in zip(self.fields[self._fixed :], value[self._fixed :]):
            offsets[name] = pos
            if isinstance(f, Pointer):
                patches.append((len(parts), f.target))
                parts.append(b"")
                pos += Pointer.size
                continue
            packed = f.pack(v)
            chunk = packed if isinstance(packed, list) else [packed]
            parts.extend(chunk)
            pos += sum(len(c) for c in chunk)
        for index, target in patches:
            parts[index] = u32.pack(offsets[target])
        return parts

    def pack(self, value: Any) -> bytes:
        return b"".join(self.pack_parts(value))

    def unpack(self, body: bytes | memoryview) -> Any:
        buf = memoryview(body)
        offset, values = 0, []
        for _, f in self.fields:
            v, offset = f.unpack(buf, offset)
            values.append(v)
        return self.type._make(values)
