"""Every SPICE message spicestream speaks, declared once as data.

Each row is (channel, type id, name, fields). Channel None means the base messages every
channel carries (ids below 100). From the rows this module builds, for each direction, one
namedtuple class per message, reachable as `SERVER.<CHANNEL>_<NAME>` (base messages without a
prefix, e.g. `SERVER.SET_ACK`, `CLIENT.INPUTS_KEY_DOWN`), and `encode`/`decode` derived from the
declaration. The same table serves the server and the in-repo test client.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from .constants import ChannelType as Ch
from .wire import (
    Array,
    Blob,
    Clip,
    Layout,
    Point,
    Point16,
    Pointer,
    ProtocolError,
    Record,
    Rect,
    Rest,
    i32,
    u8,
    u16,
    u32,
    u64,
)

ChannelEntry = Record("ChannelEntry", [("type", u8), ("id", u8)])
Head = Record(
    "Head",
    [("monitor_id", u32), ("surface_id", u32), ("width", u32), ("height", u32),
     ("x", u32), ("y", u32), ("flags", u32)],
)
WaitEntry = Record("WaitEntry", [("channel_type", u8), ("channel_id", u8), ("serial", u64)])

# Server -> client. Brief §3, §4.1, §5.3-§5.11, §7.
SERVER_TABLE: list[tuple[Ch | None, int, str, list[tuple[str, Any]]]] = [
    (None, 1, "MIGRATE", [("flags", u32)]),
    (None, 3, "SET_ACK", [("generation", u32), ("window", u32)]),
    (None, 4, "PING", [("id", u32), ("timestamp", u64), ("padding", Rest())]),
    (None, 5, "WAIT_FOR_CHANNELS", [("waits", Array(u8, WaitEntry))]),
    (None, 6, "DISCONNECTING", [("time_stamp", u64), ("reason", u32)]),
    (None, 7, "NOTIFY", [("time_stamp", u64), ("severity", u32), ("visibility", u32),
                         ("what", u32), ("message", Blob(u32))]),
    (Ch.MAIN, 103, "INIT", [("session_id", u32), ("display_channels_hint", u32),
                            ("supported_mouse_modes", u32), ("current_mouse_mode", u32),
                            ("agent_connected", u32), ("agent_tokens", u32),
                            ("multi_media_time", u32), ("ram_hint", u32)]),
    (Ch.MAIN, 104, "CHANNELS_LIST", [("channels", Array(u32, ChannelEntry))]),
    (Ch.MAIN, 105, "MOUSE_MODE", [("supported_modes", u16), ("current_mode", u16)]),
    (Ch.MAIN, 106, "MULTI_MEDIA_TIME", [("time", u32)]),
    # The agent (brief §4.1; server/agent.py): AGENT_DATA carries up to 2048 bytes of the
    # VD_AGENT stream (protocol/agent.py), each one spending a token the client granted.
    (Ch.MAIN, 107, "AGENT_CONNECTED", []),
    (Ch.MAIN, 108, "AGENT_DISCONNECTED", [("error_code", u32)]),
    (Ch.MAIN, 109, "AGENT_DATA", [("data", Rest())]),
    (Ch.MAIN, 110, "AGENT_TOKEN", [("num_tokens", u32)]),
    (Ch.MAIN, 115, "AGENT_CONNECTED_TOKENS", [("num_tokens", u32)]),
    (Ch.MAIN, 113, "NAME", [("name", Blob(u32))]),
    (Ch.MAIN, 114, "UUID", [("uuid", Rest())]),
    (Ch.DISPLAY, 102, "MARK", []),
    (Ch.DISPLAY, 103, "RESET", []),
    (Ch.DISPLAY, 122, "STREAM_CREATE", [("surface_id", u32), ("id", u32), ("flags", u8),
                                        ("codec_type", u8), ("stamp", u64),
                                        ("stream_width", u32), ("stream_height", u32),
                                        ("src_width", u32), ("src_height", u32),
                                        ("dest", Rect), ("clip", Clip())]),
    (Ch.DISPLAY, 123, "STREAM_DATA", [("id", u32), ("multi_media_time", u32),
                                      ("data", Blob(u32))]),
    (Ch.DISPLAY, 124, "STREAM_CLIP", [("id", u32), ("clip", Clip())]),
    (Ch.DISPLAY, 125, "STREAM_DESTROY", [("id", u32)]),
    (Ch.DISPLAY, 126, "STREAM_DESTROY_ALL", []),
    (Ch.DISPLAY, 302, "DRAW_FILL", [("surface_id", u32), ("box", Rect), ("clip", Clip()),
                                    ("brush_type", u8), ("color", u32), ("rop", u16),
                                    ("mask_flags", u8), ("mask_pos", Point),
                                    ("mask_bitmap", u32)]),
    # DRAW_COPY: DisplayBase + Copy; `image` is the ImageDescriptor plus its payload, appended
    # after the fixed part and pointed to by src_bitmap (brief §5.8).
    (Ch.DISPLAY, 304, "DRAW_COPY", [("surface_id", u32), ("box", Rect), ("clip", Clip()),
                                    ("src_bitmap", Pointer("image")), ("src_area", Rect),
                                    ("rop", u16), ("scale_mode", u8), ("mask_flags", u8),
                                    ("mask_pos", Point), ("mask_bitmap", u32),
                                    ("image", Rest())]),
    (Ch.DISPLAY, 314, "SURFACE_CREATE", [("surface_id", u32), ("width", u32), ("height", u32),
                                         ("format", u32), ("flags", u32)]),
    (Ch.DISPLAY, 315, "SURFACE_DESTROY", [("surface_id", u32)]),
    (Ch.DISPLAY, 316, "STREAM_DATA_SIZED", [("id", u32), ("multi_media_time", u32),
                                            ("width", u32), ("height", u32), ("dest", Rect),
                                            ("data", Blob(u32))]),
    (Ch.DISPLAY, 317, "MONITORS_CONFIG", [("count", u16), ("max_allowed", u16),
                                          ("heads", Rest())]),
    (Ch.DISPLAY, 319, "STREAM_ACTIVATE_REPORT", [("stream_id", u32), ("unique_id", u32),
                                                 ("max_window_size", u32),
                                                 ("timeout_ms", u32)]),
    (Ch.DISPLAY, 320, "GL_SCANOUT_UNIX", [("width", u32), ("height", u32), ("stride", u32),
                                          ("drm_fourcc_format", u32), ("flags", u32)]),
    (Ch.DISPLAY, 321, "GL_DRAW", [("x", u32), ("y", u32), ("w", u32), ("h", u32)]),
    (Ch.INPUTS, 101, "INIT", [("keyboard_modifiers", u16)]),
    (Ch.INPUTS, 102, "KEY_MODIFIERS", [("modifiers", u16)]),
    (Ch.INPUTS, 111, "MOUSE_MOTION_ACK", []),
    # Sound (server/audio.py). spice.proto: audio_data_mode and audio_fmt are 16-bit enums on
    # the wire (the old protocol.h structs say u32; the marshallers and spice-html5 use u16).
    # MODE goes before START (spice-gtk builds its decoder on START from the mode); packets
    # are 10 ms; `time` is the media clock (brief §4.4), never 0 (spice-html5 restarts).
    (Ch.PLAYBACK, 101, "DATA", [("time", u32), ("data", Rest())]),
    (Ch.PLAYBACK, 102, "MODE", [("time", u32), ("mode", u16), ("data", Rest())]),
    (Ch.PLAYBACK, 103, "START", [("channels", u32), ("format", u16), ("frequency", u32),
                                 ("time", u32)]),
    (Ch.PLAYBACK, 104, "STOP", []),
    (Ch.PLAYBACK, 105, "VOLUME", [("volume", Array(u8, u16))]),  # 65535: full scale
    (Ch.PLAYBACK, 106, "MUTE", [("mute", u8)]),
    (Ch.PLAYBACK, 107, "LATENCY", [("latency_ms", u32)]),
    (Ch.RECORD, 101, "START", [("channels", u32), ("format", u16), ("frequency", u32)]),
    (Ch.RECORD, 102, "STOP", []),
    (Ch.RECORD, 103, "VOLUME", [("volume", Array(u8, u16))]),
    (Ch.RECORD, 104, "MUTE", [("mute", u8)]),
    (Ch.CURSOR, 101, "INIT", [("position", Point16), ("trail_length", u16),
                              ("trail_frequency", u16), ("visible", u8), ("cursor", Rest())]),
    (Ch.CURSOR, 102, "RESET", []),
    (Ch.CURSOR, 103, "SET", [("position", Point16), ("visible", u8), ("cursor", Rest())]),
    (Ch.CURSOR, 104, "MOVE", [("position", Point16)]),
    (Ch.CURSOR, 105, "HIDE", []),
]

# Client -> server. Brief §3, §4.2, §5.2, §7.1.
CLIENT_TABLE: list[tuple[Ch | None, int, str, list[tuple[str, Any]]]] = [
    (None, 1, "ACK_SYNC", [("generation", u32)]),
    (None, 2, "ACK", []),
    (None, 3, "PONG", [("id", u32), ("timestamp", u64)]),
    (None, 4, "MIGRATE_FLUSH_MARK", []),
    (None, 5, "MIGRATE_DATA", [("data", Rest())]),
    (None, 6, "DISCONNECTING", [("time_stamp", u64), ("reason", u32)]),
    (Ch.MAIN, 101, "CLIENT_INFO", [("cache_size", u64)]),
    (Ch.MAIN, 104, "ATTACH_CHANNELS", []),
    (Ch.MAIN, 105, "MOUSE_MODE_REQUEST", [("mode", u16)]),
    (Ch.MAIN, 106, "AGENT_START", [("num_tokens", u32)]),
    (Ch.MAIN, 107, "AGENT_DATA", [("data", Rest())]),
    (Ch.MAIN, 108, "AGENT_TOKEN", [("num_tokens", u32)]),
    (Ch.DISPLAY, 101, "INIT", [("pixmap_cache_id", u8), ("pixmap_cache_size", u64),
                               ("glz_dictionary_id", u8), ("glz_window_size", i32)]),
    (Ch.DISPLAY, 102, "STREAM_REPORT", [("stream_id", u32), ("unique_id", u32),
                                        ("start_frame_mm_time", u32),
                                        ("end_frame_mm_time", u32), ("num_frames", u32),
                                        ("num_drops", u32), ("last_frame_delay", i32),
                                        ("audio_delay", u32)]),
    (Ch.DISPLAY, 103, "PREFERRED_COMPRESSION", [("image_compression", u8)]),
    (Ch.DISPLAY, 104, "GL_DRAW_DONE", []),
    (Ch.DISPLAY, 105, "PREFERRED_VIDEO_CODEC_TYPE", [("codecs", Array(u8, u8))]),
    # The microphone: MODE, START_MARK, then one 10 ms packet per DATA (spice-gtk sends
    # time 0 throughout: the server does not use it).
    (Ch.RECORD, 101, "DATA", [("time", u32), ("data", Rest())]),
    (Ch.RECORD, 102, "MODE", [("time", u32), ("mode", u16), ("data", Rest())]),
    (Ch.RECORD, 103, "START_MARK", [("time", u32)]),
    (Ch.INPUTS, 101, "KEY_DOWN", [("code", u32)]),
    (Ch.INPUTS, 102, "KEY_UP", [("code", u32)]),
    (Ch.INPUTS, 103, "KEY_MODIFIERS", [("modifiers", u16)]),
    (Ch.INPUTS, 104, "KEY_SCANCODE", [("codes", Rest())]),
    (Ch.INPUTS, 111, "MOUSE_MOTION", [("dx", i32), ("dy", i32), ("buttons_state", u16)]),
    (Ch.INPUTS, 112, "MOUSE_POSITION", [("x", u32), ("y", u32), ("buttons_state", u16),
                                        ("display_id", u8)]),
    (Ch.INPUTS, 113, "MOUSE_PRESS", [("button", u8), ("buttons_state", u16)]),
    (Ch.INPUTS, 114, "MOUSE_RELEASE", [("button", u8), ("buttons_state", u16)]),
]

# The most a client message's body may hold, so that a peer cannot make us buffer (or decode)
# more than the protocol needs (brief §2). Fixed-size messages get their size plus a little
# slack (spice-html5 sends an 11-byte MOUSE_MOTION); variable ones are listed here; types we
# do not declare are skipped by size, up to UNKNOWN_BODY_LIMIT.
FIXED_BODY_SLACK = 16
CLIENT_BODY_LIMITS = {
    "MIGRATE_DATA": 64 << 10,  # we never migrate; spice-gtk sends none
    "MAIN_AGENT_DATA": 4096,  # VD_AGENT chunks are at most 2048 bytes (brief §8)
    "DISPLAY_PREFERRED_VIDEO_CODEC_TYPE": 1 + 255,  # u8 count, u8 codecs
    "INPUTS_KEY_SCANCODE": 64,  # one key's make/break bytes: a few, up to the Pause sequence
    "RECORD_DATA": 4 + 4 * 1920,  # 10 ms: an Opus packet (<= 1275) or raw PCM (1920 B stereo)
    "RECORD_MODE": 4 + 2 + 64,
}
UNKNOWN_BODY_LIMIT = 64 << 10

HEAD = Head  # MONITORS_CONFIG heads are packed by the caller with HEAD.pack (see display)


class Direction:
    """The messages of one direction: classes by name, layouts by (channel, type id)."""

    def __init__(self, table):
        self.names = SimpleNamespace()
        self._by_key: dict[tuple[Ch | None, int], Layout] = {}
        self._type_of: dict[type, int] = {}
        self._layout_of: dict[type, Layout] = {}
        for channel, type_id, name, fields in table:
            full = name if channel is None else f"{channel.name}_{name}"
            key = (channel, type_id)
            if key in self._by_key or hasattr(self.names, full):
                raise ValueError(f"duplicate message {full} ({type_id})")
            layout = Layout(full, fields)
            layout.type.type_id = type_id
            layout.type.channel = channel
            self._by_key[key] = layout
            self._type_of[layout.type] = type_id
            self._layout_of[layout.type] = layout
            setattr(self.names, full, layout.type)
            # Also an attribute of our own: `SERVER.DISPLAY_STREAM_DATA` is read per frame,
            # and a plain attribute is found without a call to __getattr__.
            self.__dict__[full] = layout.type

    def __getattr__(self, name):  # not a message: names says so (AttributeError)
        return getattr(self.names, name)

    def layouts(self):
        return list(self._by_key.values())

    def encode_parts(self, message) -> tuple[int, list]:
        """Return (type id, body parts) for a message instance."""
        cls = type(message)
        return self._type_of[cls], self._layout_of[cls].pack_parts(message)

    def encode(self, message) -> tuple[int, bytes]:
        type_id, parts = self.encode_parts(message)
        return type_id, b"".join(parts)

    def layout(self, channel: int, type_id: int) -> Layout | None:
        """The declaration of this message type on this channel; None if we know none."""
        layout = self._by_key.get((None, type_id)) if type_id < 100 else None
        if layout is None:
            # Ch is an IntEnum: a plain int finds (Ch.X, type_id), and an unknown one nothing.
            layout = self._by_key.get((channel, type_id))
        return layout

    def body_limit(self, channel: int, type_id: int) -> int:
        """The largest body a message of this type may have (see CLIENT_BODY_LIMITS)."""
        layout = self.layout(channel, type_id)
        if layout is None:
            return UNKNOWN_BODY_LIMIT
        if layout.name in CLIENT_BODY_LIMITS:
            return CLIENT_BODY_LIMITS[layout.name]
        if layout.fixed_size is None:
            raise ValueError(f"{layout.name} is variable-sized: give it a limit in CLIENT_BODY_LIMITS")
        return layout.fixed_size + FIXED_BODY_SLACK

    def decode(self, channel: int, type_id: int, body) -> Any | None:
        """Decode a body; None for a type this channel does not know (skipped by size).

        Raises ProtocolError when a known type's body is truncated. Trailing bytes are
        tolerated (spice-html5 sends an 11-byte MOUSE_MOTION, brief §9).
        """
        layout = self.layout(channel, type_id)
        return None if layout is None else layout.unpack(body)


SERVER = Direction(SERVER_TABLE)
CLIENT = Direction(CLIENT_TABLE)

__all__ = ["SERVER", "CLIENT", "HEAD", "ChannelEntry", "Rect", "Point", "Point16", "ProtocolError"]
