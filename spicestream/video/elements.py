"""GStreamer encoder elements spicestream knows, as data: codec, properties, rate property.

Every entry is configured for low latency (no B-frames, no lookahead, one access unit per
buffer) and for the bitstream the clients expect (brief §6.2): Annex-B access units with
in-band parameter sets for H.264/H.265, raw frames for VP8/VP9, whole JPEGs for MJPEG.
Hardware entries come first for their codec: a working one is preferred (see probe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .codec import Codec

KEY_INTERVAL = 600  # frames between periodic key frames (20 s at 30 fps): each is a burst on
# a slow link, and late joiners, stalls and drops get forced ones when they need them
VBV_MS = 150  # rate-control buffer: no frame much larger than this much of the bit rate


@dataclass(frozen=True)
class ElementSpec:
    element: str
    codec: Codec
    properties: str  # gst-launch syntax
    rate_property: str | None  # bit-rate property, or None (MJPEG: quality instead)
    rate_unit: int  # bits per unit of the rate property (1000 for kbit/s)
    hardware: bool = False
    # What the encoder is fed: most take I420; hardware ones get NV12.
    input_format: str = "I420"
    output_caps: str = ""
    quality_property: str | None = None
    # Properties that replace some of `properties` for frames of at most SMALL_FRAME_PIXELS:
    # threads that cost more in handing work over than they save there.
    small_frame_properties: str = ""
    # Whether the encoder writes the input's colorimetry into the stream, so that decoders
    # convert back with it whatever the size (yuv.py: who may be fed libyuv's BT.601).
    states_colorimetry: bool = False


SMALL_FRAME_PIXELS = 640 * 480


H264_CAPS = "video/x-h264,stream-format=byte-stream,alignment=au"
H265_CAPS = "video/x-h265,stream-format=byte-stream,alignment=au"

ELEMENTS: list[ElementSpec] = [
    # -- hardware (probed in a child process before use) ----------------------------------
    ElementSpec("nvh264enc", Codec.H264, f"preset=low-latency-hq zerolatency=true bframes=0 "
                f"rc-mode=cbr gop-size={KEY_INTERVAL} aud=true", "bitrate", 1000, True, "NV12", H264_CAPS),
    ElementSpec("nvh265enc", Codec.H265, f"preset=low-latency-hq zerolatency=true bframes=0 "
                f"rc-mode=cbr gop-size={KEY_INTERVAL} aud=true", "bitrate", 1000, True, "NV12", H265_CAPS),
    ElementSpec("vah264enc", Codec.H264, f"b-frames=0 rate-control=cbr target-usage=7 "
                f"key-int-max={KEY_INTERVAL} aud=true", "bitrate", 1000, True, "NV12", H264_CAPS),
    ElementSpec("vah265enc", Codec.H265, f"b-frames=0 rate-control=cbr target-usage=7 "
                f"key-int-max={KEY_INTERVAL} aud=true", "bitrate", 1000, True, "NV12", H265_CAPS),
    ElementSpec("vavp9enc", Codec.VP9, f"rate-control=cbr target-usage=7 key-int-max={KEY_INTERVAL}",
                "bitrate", 1000, True, "NV12"),
    ElementSpec("vajpegenc", Codec.MJPEG, "", None, 1, True, "NV12", quality_property="quality"),
    ElementSpec("vaapih264enc", Codec.H264, f"rate-control=cbr max-bframes=0 tune=low-power "
                f"keyframe-period={KEY_INTERVAL} aud=true", "bitrate", 1000, True, "NV12", H264_CAPS),
    ElementSpec("vaapih265enc", Codec.H265, f"rate-control=cbr max-bframes=0 "
                f"keyframe-period={KEY_INTERVAL} aud=true", "bitrate", 1000, True, "NV12", H265_CAPS),
    ElementSpec("qsvh264enc", Codec.H264, f"b-frames=0 rate-control=cbr target-usage=7 "
                f"gop-size={KEY_INTERVAL}", "bitrate", 1000, True, "NV12", H264_CAPS),
    ElementSpec("qsvh265enc", Codec.H265, f"b-frames=0 rate-control=cbr target-usage=7 "
                f"gop-size={KEY_INTERVAL}", "bitrate", 1000, True, "NV12", H265_CAPS),
    ElementSpec("msdkh264enc", Codec.H264, f"async-depth=1 rate-control=cbr b-frames=0 "
                f"target-usage=7 gop-size={KEY_INTERVAL}", "bitrate", 1000, True, "NV12", H264_CAPS),
    ElementSpec("msdkh265enc", Codec.H265, f"async-depth=1 rate-control=cbr b-frames=0 "
                f"target-usage=7 gop-size={KEY_INTERVAL}", "bitrate", 1000, True, "NV12", H265_CAPS),
    # -- software ------------------------------------------------------------------------
    # vbv-buf-capacity bounds any one frame (key frames included) to ~VBV_MS of the bit
    # rate: a key frame that takes half a second to send on a slow link is half a second of
    # latency.
    ElementSpec("x264enc", Codec.H264, f"tune=zerolatency speed-preset=ultrafast bframes=0 "
                f"rc-lookahead=0 sync-lookahead=0 byte-stream=true aud=true sliced-threads=true "
                f"threads=2 key-int-max={KEY_INTERVAL} vbv-buf-capacity={VBV_MS}", "bitrate", 1000,
                output_caps=H264_CAPS,
                # 640x360: 27 % less x264 CPU and no slower (sliced threads pay off from ~720p)
                small_frame_properties="threads=1 sliced-threads=false",
                states_colorimetry=True),  # the SPS's VUI
    ElementSpec("openh264enc", Codec.H264, f"complexity=low rate-control=bitrate "
                f"gop-size={KEY_INTERVAL} usage-type=screen", "bitrate", 1, output_caps=H264_CAPS),
    ElementSpec("vp8enc", Codec.VP8, f"deadline=1 cpu-used=16 lag-in-frames=0 end-usage=cbr "
                f"error-resilient=default threads=2 keyframe-max-dist={KEY_INTERVAL} "
                f"buffer-initial-size=100 buffer-optimal-size=120 buffer-size=150",
                # One thread for a small frame: libvpx's second cost 8.9 against 2.9-3.1 ms
                # of CPU a 640x360 frame here (test_codecs has the command).
                "target-bitrate", 1, small_frame_properties="threads=1"),
    ElementSpec("vp9enc", Codec.VP9, f"deadline=1 cpu-used=8 lag-in-frames=0 end-usage=cbr "
                f"error-resilient=default threads=2 row-mt=true keyframe-max-dist={KEY_INTERVAL} "
                f"buffer-initial-size=100 buffer-optimal-size=120 buffer-size=150",
                "target-bitrate", 1),
    # sao=1: libx265 3.5 never frees the SAO buffers of an encoder closed with SAO off (which
    # ultrafast turns off; x265 issue #641): ~10 KB per encoder at 256x192, ~100 KB at 720p,
    # lost at every stream start or codec switch. SAO on costs ~24 % more x265 CPU.
    ElementSpec("x265enc", Codec.H265, f"tune=zerolatency speed-preset=ultrafast "
                f"key-int-max={KEY_INTERVAL} option-string=bframes=0:rc-lookahead=0:aud=1:"
                f"repeat-headers=1:vbv-bufsize={VBV_MS}:vbv-maxrate=0:sao=1",
                "bitrate", 1000, output_caps=H265_CAPS, states_colorimetry=True),  # the SPS's VUI
    # JPEG is full-range YCbCr: fed I420 (limited range) it would decode washed out, so
    # jpegenc gets BGRx and libjpeg converts.
    ElementSpec("jpegenc", Codec.MJPEG, "quality=80", None, 1, input_format="BGRx",
                quality_property="quality"),
]

BY_NAME = {spec.element: spec for spec in ELEMENTS}


def candidates(codec: Codec) -> list[ElementSpec]:
    """Elements for `codec`, hardware first, in the order they are preferred."""
    return [s for s in ELEMENTS if s.codec == codec]
