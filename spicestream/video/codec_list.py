"""Codec lists ("gstreamer:h264;spice:mjpeg", spice-server/QEMU syntax) and codec selection.

The codec of a stream is the first entry of the server's list that the client decodes (its
display caps), that works here (probe), and that has not already failed for this client,
after the list is re-sorted by the client's PREFERRED_VIDEO_CODEC_TYPE (brief §5.10.9).
"""

from __future__ import annotations

from dataclasses import dataclass

from .codec import Codec, client_decodes

ENCODERS = {"gstreamer": set(Codec), "spice": {Codec.MJPEG}}
DEFAULT_CODECS = "gstreamer:h264;gstreamer:vp8;gstreamer:vp9;gstreamer:h265;spice:mjpeg;gstreamer:mjpeg"


class CodecListError(ValueError):
    """A codec list that cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class CodecEntry:
    encoder: str  # "gstreamer" or "spice"
    codec: Codec

    def __str__(self) -> str:
        return f"{self.encoder}:{self.codec.label}"


def parse_codec_list(text: str) -> list[CodecEntry]:
    entries: list[CodecEntry] = []
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        encoder, sep, codec_name = item.partition(":")
        encoder, codec_name = encoder.strip().lower(), codec_name.strip().lower()
        if not sep or not encoder or not codec_name:
            raise CodecListError(f"entry {item!r} is not ENCODER:CODEC")
        if encoder not in ENCODERS:
            raise CodecListError(f"unknown encoder {encoder!r} in {item!r} (known: {', '.join(ENCODERS)})")
        try:
            codec = Codec[codec_name.upper()]
        except KeyError:
            known = ", ".join(c.label for c in Codec)
            raise CodecListError(f"unknown codec {codec_name!r} in {item!r} (known: {known})") from None
        if codec not in ENCODERS[encoder]:
            raise CodecListError(f"encoder {encoder!r} cannot encode {codec.label} ({item!r})")
        entry = CodecEntry(encoder, codec)
        if entry not in entries:
            entries.append(entry)
    if not entries:
        raise CodecListError("the codec list is empty")
    return entries


def rank_by_preference(entries: list[CodecEntry], preferred: list[int]) -> list[CodecEntry]:
    """Stable re-sort: codecs the client listed first, in its order; unlisted ones after."""
    rank: dict[int, int] = {}
    for value in preferred:
        if value in Codec._value2member_map_ and value not in rank:
            rank[value] = len(rank)
    return sorted(entries, key=lambda e: rank.get(e.codec, len(rank)))


def choose_codec(entries: list[CodecEntry], display_caps, usable: set[CodecEntry],
                 preferred: list[int] = (), failed: set[CodecEntry] = frozenset()) -> CodecEntry | None:
    for entry in rank_by_preference(entries, list(preferred)):
        if entry in usable and entry not in failed and client_decodes(display_caps, entry.codec):
            return entry
    return None


CODEC_SWITCH_INTERVAL_S = 2.0


class SwitchPacer:
    """At most one codec switch per interval. Each switch rebuilds an encoder (tens of ms of
    CPU, a key frame on the wire): a client that changes its preferred codec many times a
    second must not make us do that every time. A switch asked for too soon is remembered and
    made once the interval has passed, for whatever the client prefers by then."""

    def __init__(self, interval: float = CODEC_SWITCH_INTERVAL_S):
        self.interval = interval
        self.pending = False
        self._last = float("-inf")

    def request(self, now: float) -> bool:
        """A switch is wanted: True to make it now, False if it waits (see `due`)."""
        if now - self._last >= self.interval:
            self._last, self.pending = now, False
            return True
        self.pending = True
        return False

    def due(self, now: float) -> bool:
        """Called periodically: True when a waiting switch may be made now."""
        if self.pending and now - self._last >= self.interval:
            self._last, self.pending = now, False
            return True
        return False
