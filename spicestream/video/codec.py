"""Video codecs as SPICE numbers them, and the display caps that say a client decodes them."""

from __future__ import annotations

from enum import IntEnum

from ..protocol.constants import DisplayCap, has_cap


class Codec(IntEnum):
    MJPEG = 1
    VP8 = 2
    H264 = 3
    VP9 = 4
    H265 = 5

    @property
    def label(self) -> str:
        return self.name.lower()


CLIENT_CAP = {
    Codec.MJPEG: DisplayCap.CODEC_MJPEG,
    Codec.VP8: DisplayCap.CODEC_VP8,
    Codec.H264: DisplayCap.CODEC_H264,
    Codec.VP9: DisplayCap.CODEC_VP9,
    Codec.H265: DisplayCap.CODEC_H265,
}


def client_decodes(display_caps, codec: Codec) -> bool:
    """A client without MULTI_CODEC knows only MJPEG (brief §5.1)."""
    if not has_cap(display_caps, DisplayCap.MULTI_CODEC):
        return codec == Codec.MJPEG
    return has_cap(display_caps, CLIENT_CAP[codec])
