"""Turning a codec-list entry into a working encoder, using the probe's verdicts.

For a `gstreamer:<codec>` entry the first usable element for the codec is used, hardware
first (elements.py order). The built-in MJPEG encoder is the fallback of last resort: it is
appended to every list, so a client always ends with a codec it can play.
"""

from __future__ import annotations

import logging

from .codec import Codec
from .codec_list import DEFAULT_CODECS, CodecEntry, choose_codec, parse_codec_list
from .elements import BY_NAME
from .encoder import EncoderError, VideoEncoder
from .probe import ProbeResult, cached_probe

log = logging.getLogger("spicestream.video")
FALLBACK = CodecEntry("spice", Codec.MJPEG)


class VideoCodecs:
    def __init__(self, codecs: str | list[CodecEntry] = DEFAULT_CODECS,
                 probe: list[ProbeResult] | None = None):
        entries = parse_codec_list(codecs) if isinstance(codecs, str) else list(codecs)
        if FALLBACK not in entries:
            entries.append(FALLBACK)
        self.entries = entries
        self._probe = probe

    @property
    def probe(self) -> list[ProbeResult]:
        if self._probe is None:
            self._probe = cached_probe()
        return self._probe

    def elements_for(self, entry: CodecEntry) -> list[ProbeResult]:
        return [r for r in self.probe if r.usable and r.backend == entry.encoder and r.codec == entry.codec]

    @property
    def usable(self) -> set[CodecEntry]:
        return {e for e in self.entries if self.elements_for(e)}

    def choose(self, display_caps, preferred=(), failed=frozenset()) -> CodecEntry | None:
        return choose_codec(self.entries, display_caps, self.usable, preferred, failed)

    def create(self, entry: CodecEntry, width: int, height: int, bit_rate: int,
               on_frame, on_error, fps: int = 30, pixel_format: str = "BGRx",
               flip: bool = False, dmabuf: bool = False) -> VideoEncoder:
        """Create an encoder for `entry`, trying its usable elements in order; with `flip`, it
        turns its input upside down (a bottom-up scanout for a client that ignores the flag);
        `dmabuf`: it will be fed DMA-BUF scanouts, not frames in memory."""
        errors = []
        for result in self.elements_for(entry):
            try:
                if entry.encoder == "spice":
                    from .mjpeg import MjpegEncoder

                    return MjpegEncoder(entry.codec, width, height, bit_rate, on_frame, on_error,
                                        pixel_format=pixel_format, flip=flip)
                from .gst_encoder import GstEncoder

                return GstEncoder(BY_NAME[result.element], width, height, bit_rate, on_frame, on_error,
                                  fps, pixel_format, flip, dmabuf)
            except (EncoderError, RuntimeError, ValueError) as exc:
                errors.append(f"{result.element}: {exc}")
                log.warning("cannot create %s encoder: %s", result.element, exc)
        raise EncoderError(f"no working encoder for {entry}: {'; '.join(errors) or 'none usable'}")

    def table(self) -> list[dict]:
        return [{"codec": r.codec.label, "encoder": r.backend, "element": r.element,
                 "hardware": r.hardware, "usable": r.usable, "reason": r.reason} for r in self.probe]
