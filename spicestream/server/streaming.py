"""One display client's video stream: create, feed, fall back, end (brief §5.10, §6).

The display decides *where* video is (StreamDetector); this decides, per client, which codec
carries it and moves frames: the newest frame's region goes to the encoder only when the
encoder has room and the connection can take more, so a slow client skips frames instead of
queueing them. Encoded frames come back on an encoder thread and are handed to the event loop.

Failures: an encoder error rebuilds the encoder once; a second error, a creation failure or
the client's "cannot decode" report moves this client to the next codec of the list, ending
at the built-in MJPEG. When the stream ends, its area is re-sent losslessly.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

from ..display.streams import StreamRegion
from ..protocol.constants import DisplayCap, has_cap
from ..protocol.messages import SERVER, Rect
from ..video.codec_list import CodecEntry
from ..video.encoder import EncodedFrame, EncoderError, VideoEncoder

log = logging.getLogger("spicestream.streams")

STREAM_TOP_DOWN = 1
REPORT_WINDOW = 5  # frames per client report (spice-server's value)
REPORT_TIMEOUT_MS = 1000
UNSUPPORTED_DROPS = 0xFFFFFFFF  # num_drops of a "cannot decode this stream" report
BITS_PER_PIXEL_FRAME = 0.1  # starting bit rate: about 6 Mbit/s for 1080p at 30 fps...
MIN_START_BIT_RATE = 2_000_000  # ...but never so low that a small region looks poor


@dataclass
class ActiveStream:
    region: StreamRegion
    entry: CodecEntry
    encoder: VideoEncoder
    unique_id: int
    generation: int = -1  # display frame generation last handed to the encoder
    errors: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    copied_bytes: int = 0
    stats: dict = field(default_factory=dict)


class StreamSender:
    def __init__(self, channel, codecs, caps):
        self.channel, self.conn, self.core = channel, channel.conn, channel.core
        self.display = self.core.display
        self.codecs = codecs
        self.caps = caps
        self.sized = has_cap(caps, DisplayCap.SIZED_STREAM)
        self.reports = has_cap(caps, DisplayCap.STREAM_REPORT)
        self.failed: set[CodecEntry] = set()
        self.preferred: list[int] = []
        self.active: ActiveStream | None = None
        self._skip_region: int | None = None  # region id with no usable codec for us
        self._loop = asyncio.get_running_loop()
        self.history: list[dict] = []  # ended streams' stats, newest last

    # -- lifecycle -------------------------------------------------------------------------
    def sync(self) -> None:
        """Follow the display's stream region: end a stale stream, start a new one."""
        region = self.display.stream_region
        active = self.active
        if active is not None and (region is None or region.stream_id != active.region.stream_id):
            self.end(lossless=True)
        if region is not None and self.active is None and region.stream_id != self._skip_region:
            self._start(region)

    def _start(self, region: StreamRegion) -> None:
        while True:
            entry = self.codecs.choose(self.caps, self.preferred, self.failed)
            if entry is None:
                log.info("%s: no codec left for a stream; the area stays lossless", self.conn.peer)
                self._skip_region = region.stream_id
                return
            try:
                encoder = self._create_encoder(entry, region)
                break
            except EncoderError as exc:
                log.warning("%s: %s unusable, trying the next codec: %s", self.conn.peer, entry, exc)
                self.failed.add(entry)
        stream = ActiveStream(region, entry, encoder, secrets.randbits(32))
        self.active = stream
        dest = Rect(top=region.y, left=region.x, bottom=region.y + region.height,
                    right=region.x + region.width)
        self.conn.send(SERVER.DISPLAY_STREAM_CREATE(
            surface_id=0, id=region.stream_id, flags=STREAM_TOP_DOWN, codec_type=entry.codec,
            stamp=0, stream_width=region.width, stream_height=region.height,
            src_width=region.width, src_height=region.height, dest=dest, clip=None))
        if self.reports:
            self.conn.send(SERVER.DISPLAY_STREAM_ACTIVATE_REPORT(
                region.stream_id, stream.unique_id, REPORT_WINDOW, REPORT_TIMEOUT_MS))
        with self.display.lock:
            self.channel.view.stream_mask = region.tile_mask(self.channel.view.damage.cells.shape)
        log.info("%s: stream %d %dx%d at %d,%d as %s (%s)", self.conn.peer, region.stream_id,
                 region.width, region.height, region.x, region.y, entry, encoder.element)

    def _create_encoder(self, entry: CodecEntry, region: StreamRegion) -> VideoEncoder:
        fps = max(1, min(60, round(self.display.fps)))
        bit_rate = max(MIN_START_BIT_RATE, int(region.width * region.height * fps * BITS_PER_PIXEL_FRAME))

        def on_frame(frame: EncodedFrame) -> None:  # encoder thread
            self._loop.call_soon_threadsafe(self._send_frame, encoder, frame)

        def on_error(message: str) -> None:  # any thread
            self._loop.call_soon_threadsafe(self._encoder_failed, encoder, message)

        encoder = self.codecs.create(entry, region.width, region.height, bit_rate, on_frame, on_error)
        return encoder

    def end(self, lossless: bool) -> None:
        """STREAM_DESTROY; with `lossless`, the area is then re-sent as exact pixels."""
        stream, self.active = self.active, None
        if stream is None:
            return
        stream.encoder.close()
        stream.stats = self._stats_of(stream)
        self.history = (self.history + [stream.stats])[-8:]
        if not self.conn.closed:
            self.conn.send(SERVER.DISPLAY_STREAM_DESTROY(stream.region.stream_id))
        view = self.channel.view
        with self.display.lock:
            view.stream_mask = None
            if lossless:
                view.damage.add_rect(*stream.region.rect)

    def close(self) -> None:
        stream, self.active = self.active, None
        if stream is not None:
            stream.encoder.close()

    # -- frames ----------------------------------------------------------------------------
    def feed(self) -> None:
        """Hand the newest frame to the encoder if it has room and the socket is open."""
        stream = self.active
        if stream is None or not self.conn.can_send:
            return
        encoder = stream.encoder
        if encoder.in_flight >= encoder.max_in_flight:
            return
        frame, generation, published = self.display.current()
        if generation == stream.generation:
            return
        r = stream.region
        if frame.shape[:2] != (self.display.height, self.display.width):
            return
        stream.generation = generation
        encoder.encode(frame[r.y : r.y + r.height, r.x : r.x + r.width], self.core.mm_time_at(published))

    def _send_frame(self, encoder: VideoEncoder, frame: EncodedFrame) -> None:
        stream = self.active
        if stream is None or stream.encoder is not encoder or self.conn.closed:
            return  # a frame of a stream that has ended since
        r = stream.region
        if self.sized:
            dest = Rect(top=r.y, left=r.x, bottom=r.y + r.height, right=r.x + r.width)
            message = SERVER.DISPLAY_STREAM_DATA_SIZED(r.stream_id, frame.timestamp_ms, frame.width,
                                                       frame.height, dest, frame.data)
        else:
            message = SERVER.DISPLAY_STREAM_DATA(r.stream_id, frame.timestamp_ms, frame.data)
        self.conn.send(message)
        self.conn.flush()
        stream.frames_sent += 1
        stream.bytes_sent += len(frame.data)
        stream.copied_bytes += frame.copied_bytes
        self.channel.writable()  # room in the encoder again: feed the newest frame

    # -- failures and client feedback ------------------------------------------------------
    def _encoder_failed(self, encoder: VideoEncoder, message: str) -> None:
        stream = self.active
        if stream is None or stream.encoder is not encoder:
            return
        stream.errors += 1
        encoder.close()
        if stream.errors == 1:
            log.warning("%s: %s failed (%s); rebuilding it once", self.conn.peer, stream.entry, message)
            try:
                stream.encoder = self._create_encoder(stream.entry, stream.region)
                stream.generation = -1  # the new encoder starts with a key frame of the newest frame
                self.channel.writable()
                return
            except EncoderError as exc:
                message = str(exc)
        log.warning("%s: %s failed again (%s); switching codec", self.conn.peer, stream.entry, message)
        self.failed.add(stream.entry)
        self.end(lossless=True)
        self.channel.writable()

    def report(self, message) -> None:
        stream = self.active
        if stream is None or message.stream_id != stream.region.stream_id:
            return
        if message.unique_id != stream.unique_id:
            return  # stale: from an earlier stream with the same id
        if message.num_frames == 0 and message.num_drops == UNSUPPORTED_DROPS:
            log.warning("%s: client cannot decode %s; trying the next codec", self.conn.peer, stream.entry)
            self.failed.add(stream.entry)
            self.end(lossless=True)
            self.channel.writable()
            return
        stream.stats["last_report"] = message._asdict()

    def set_preferred(self, codecs: list[int]) -> None:
        self.preferred = list(codecs)
        if self.active is not None:
            wanted = self.codecs.choose(self.caps, self.preferred, self.failed)
            if wanted != self.active.entry:
                self.end(lossless=False)  # restart with the newly preferred codec
        self.channel.writable()

    # -- stats ---------------------------------------------------------------------------------
    def _stats_of(self, stream: ActiveStream) -> dict:
        info = stream.encoder.stats()
        info.update(stream_id=stream.region.stream_id, codec_entry=str(stream.entry),
                    frames_sent=stream.frames_sent, bytes_sent=stream.bytes_sent,
                    copied_bytes=stream.copied_bytes, region=stream.region.rect,
                    copied_bytes_per_frame=stream.copied_bytes / max(1, stream.frames_sent))
        return info

    def stats(self) -> dict:
        return {"active": self._stats_of(self.active) if self.active else None,
                "ended": list(self.history), "failed_codecs": sorted(map(str, self.failed))}
