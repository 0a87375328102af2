"""PC XT set-1 scancode bytes -> (scancode, pressed) events (brief §7.1).

Scancodes are reported the way spice-gtk numbers keys: the make code, with 0x100 added for
E0-prefixed (extended) keys; release is the make code with bit 0x80 set. Pause, the one
E1-prefixed key, is reported as 0x145.
"""

from __future__ import annotations

EXTENDED = 0x100
PAUSE = 0x145


def parse_scancodes(data: bytes) -> list[tuple[int, bool]]:
    """Decode a byte sequence (KEY_SCANCODE body, or a KEY_DOWN/UP code's bytes)."""
    events = []
    prefix, skip = 0, 0
    for b in data:
        if skip:  # second byte of an E1 (Pause) sequence
            skip -= 1
            if skip == 0:
                events.append((PAUSE, not b & 0x80))
            continue
        if b == 0xE0:
            prefix = EXTENDED
            continue
        if b == 0xE1:
            skip = 2
            continue
        if b == 0:
            continue
        events.append((prefix | (b & 0x7F), not b & 0x80))
        prefix = 0
    return events


def parse_key_code(code: int) -> list[tuple[int, bool]]:
    """KEY_DOWN / KEY_UP carry the bytes packed little-endian in a u32."""
    return parse_scancodes((code & 0xFFFFFFFF).to_bytes(4, "little"))
