"""Numbers fixed by the SPICE protocol (spice-protocol 0.14.3 enums; brief §1, §5, §7)."""

from enum import IntEnum

MAGIC = b"REDQ"
MAJOR_VERSION = 2
MINOR_VERSION = 2
TICKET_PUBKEY_BYTES = 162  # DER SubjectPublicKeyInfo of an RSA-1024 key
TICKET_CIPHER_BYTES = 128
MAX_PASSWORD_LENGTH = 60


class ChannelType(IntEnum):
    MAIN = 1
    DISPLAY = 2
    INPUTS = 3
    CURSOR = 4
    PLAYBACK = 5
    RECORD = 6
    TUNNEL = 7
    SMARTCARD = 8
    USBREDIR = 9
    PORT = 10
    WEBDAV = 11


class LinkError(IntEnum):
    OK = 0
    ERROR = 1
    INVALID_MAGIC = 2
    INVALID_DATA = 3
    VERSION_MISMATCH = 4
    NEED_SECURED = 5
    NEED_UNSECURED = 6
    PERMISSION_DENIED = 7
    BAD_CONNECTION_ID = 8
    CHANNEL_NOT_AVAILABLE = 9


class CommonCap(IntEnum):
    PROTOCOL_AUTH_SELECTION = 0
    AUTH_SPICE = 1
    AUTH_SASL = 2
    MINI_HEADER = 3


class MainCap(IntEnum):
    SEMI_SEAMLESS_MIGRATE = 0
    NAME_AND_UUID = 1
    AGENT_CONNECTED_TOKENS = 2
    SEAMLESS_MIGRATE = 3


class DisplayCap(IntEnum):
    SIZED_STREAM = 0
    MONITORS_CONFIG = 1
    COMPOSITE = 2
    A8_SURFACE = 3
    STREAM_REPORT = 4
    LZ4_COMPRESSION = 5
    PREF_COMPRESSION = 6
    GL_SCANOUT = 7
    MULTI_CODEC = 8
    CODEC_MJPEG = 9
    CODEC_VP8 = 10
    CODEC_H264 = 11
    PREF_VIDEO_CODEC_TYPE = 12
    CODEC_VP9 = 13
    CODEC_H265 = 14


class InputsCap(IntEnum):
    KEY_SCANCODE = 0


class PlaybackCap(IntEnum):
    CELT_0_5_1 = 0
    VOLUME = 1
    LATENCY = 2
    OPUS = 3


class RecordCap(IntEnum):
    CELT_0_5_1 = 0
    VOLUME = 1
    OPUS = 2


class AudioDataMode(IntEnum):
    INVALID = 0
    RAW = 1
    CELT_0_5_1 = 2
    OPUS = 3


AUDIO_FMT_S16 = 1  # signed 16-bit little-endian, interleaved


class MouseMode(IntEnum):
    SERVER = 1
    CLIENT = 2


class SurfaceFormat(IntEnum):
    XRGB32 = 32
    ARGB32 = 96


class ImageType(IntEnum):
    BITMAP = 0
    JPEG = 105
    LZ4 = 109


class BitmapFormat(IntEnum):
    BGRX32 = 8  # SPICE_BITMAP_FMT_32BIT: bytes B, G, R, x
    BGRA32 = 9  # SPICE_BITMAP_FMT_RGBA


BITMAP_TOP_DOWN = 4
SURFACE_PRIMARY = 1
ROP_OP_PUT = 0x0008
CURSOR_TYPE_ALPHA = 0

# Mouse button numbers (PRESS/RELEASE) and the buttons_state mask bits (brief §7.1).
BUTTON_MASKS = {1: 1, 2: 2, 3: 4, 4: 8, 5: 16, 6: 32, 7: 64}


def caps_to_words(bits) -> list[int]:
    """Capability bit numbers -> list of u32 words (bit n is bit n%32 of word n//32)."""
    bits = list(bits)
    words = [0] * (max(bits) // 32 + 1 if bits else 0)
    for b in bits:
        words[b // 32] |= 1 << (b % 32)
    return words


def has_cap(words, bit: int) -> bool:
    index = bit // 32
    return index < len(words) and bool(words[index] >> (bit % 32) & 1)
