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
import collections
import logging
import secrets
import threading
from dataclasses import dataclass, field

from ..display.streams import StreamRegion
from ..protocol.constants import DisplayCap, has_cap
from ..protocol.messages import SERVER, Rect
from ..stats import LatencyHistogram
from ..video.codec import Codec
from ..video.codec_list import CodecEntry, SwitchPacer
from ..video.encoder import EncodedFrame, EncoderError, VideoEncoder
from ..video.mjpeg import QUALITY_STEPS
from ..video.ratecontrol import RateController
from ..video.streampolicy import FrameLedger, Playout, QualityTuner, admit, wants_key_frame
from . import tcpinfo
from .sharing import Subscription

log = logging.getLogger("spicestream.streams")

STREAM_TOP_DOWN = 1
REPORT_WINDOW = 5  # frames per client report (spice-server's value)
REPORT_TIMEOUT_MS = 1000
UNSUPPORTED_DROPS = 0xFFFFFFFF  # num_drops of a "cannot decode this stream" report
KEY_REQUEST_WINDOW_S = 5.0
KEY_REQUESTS_TO_DEMOTE = 4
RECENT_FRAMES = 512  # per-frame timings kept for stats and benchmarks
BITS_PER_PIXEL_FRAME = 0.1  # starting bit rate: about 6 Mbit/s for 1080p at 30 fps...
MIN_START_BIT_RATE = 2_000_000  # ...but never so low that a small region looks poor


@dataclass
class ActiveStream:
    region: StreamRegion
    entry: CodecEntry
    encoder: VideoEncoder
    unique_id: int
    rate: RateController
    generation: int = -1  # display frame generation last handed to the encoder
    last_fed: float = 0.0
    errors: int = 0
    bytes_sent: int = 0
    copied_bytes: int = 0
    ledger: FrameLedger = field(default_factory=FrameLedger)
    held: EncodedFrame | None = None  # encoded, waiting for the socket (newest only)
    awaiting_key: bool = False  # an encoded frame was dropped: send nothing until a key frame
    quality: QualityTuner = field(
        default_factory=lambda: QualityTuner(len(QUALITY_STEPS) - 2, len(QUALITY_STEPS)))
    held_meta: tuple | None = None
    key_requests: list = field(default_factory=list)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT_FRAMES))
    stats: dict = field(default_factory=dict)
    # Capture -> encoded (the encoder's output reached us), and the stamp's lead when sent.
    encode_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    playout_delay: LatencyHistogram = field(default_factory=LatencyHistogram)


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
        self._skip_region: StreamRegion | None = None  # a region with no usable codec for us
        self.last_rate: RateController | None = None  # of the previous stream, to start from
        self._loop = asyncio.get_running_loop()
        self.history: list[dict] = []  # ended streams' stats, newest last
        self.switches = SwitchPacer()  # codec switches asked for by the client
        self.playout = Playout()  # stamps: what this client's reports taught holds across streams
        self._offering = False  # in _offer: an encoder working inline hands its frame over...
        self._encoded_inline: list = []  # ...here, sent when the offer is complete

    # -- lifecycle -------------------------------------------------------------------------
    def sync(self) -> None:
        """Follow the display's stream region: end a stale stream, start a new one."""
        region = self.display.stream_region
        active = self.active
        if active is not None and region is not active.region:  # ids repeat; regions are new objects
            self.end(lossless=True)
        if region is not None and self.active is None and region is not self._skip_region:
            self._start(region)

    def _start(self, region: StreamRegion) -> None:
        fps = max(1, min(60, round(self.display.fps)))
        start = max(MIN_START_BIT_RATE, int(region.width * region.height * fps * BITS_PER_PIXEL_FRAME))
        if self.last_rate is not None:  # what we learnt about this client's link still holds
            start = min(start, self.last_rate.target)
        now = self.core.clock()
        rate = RateController(start, fps, now)
        while True:
            entry = self.codecs.choose(self.caps, self.preferred, self.failed)
            if entry is None:
                log.info("%s: no codec left for a stream; the area stays lossless", self.conn.peer)
                self._skip_region = region
                return
            try:
                encoder = self._create_encoder(entry, region, rate.target, fps, self._pixel_format())
                break
            except EncoderError as exc:
                log.warning("%s: %s unusable, trying the next codec: %s", self.conn.peer, entry, exc)
                self._fell_back(entry)
        stream = ActiveStream(region, entry, encoder, secrets.randbits(32), rate,
                              last_fed=now, awaiting_key=encoder.joined_running)
        self.active = stream
        dest = Rect(top=region.y, left=region.x, bottom=region.y + region.height,
                    right=region.x + region.width)
        scanout = self.display.scanout
        # A bottom-up scanout goes out as it lies and the flag tells spice-gtk to flip it;
        # spice-html5 ignores the flag, so a browser's encoder flips it (_flip_rows).
        top_down = scanout is None or scanout.y0_top or self._flip_rows()
        flags = STREAM_TOP_DOWN if top_down else 0
        if scanout is not None:
            self.display.draws.add_consumer(self)
        self.conn.send(SERVER.DISPLAY_STREAM_CREATE(
            surface_id=0, id=region.stream_id, flags=flags, codec_type=entry.codec,
            stamp=0, stream_width=region.width, stream_height=region.height,
            src_width=region.width, src_height=region.height, dest=dest, clip=None))
        if self.reports:
            self.conn.send(SERVER.DISPLAY_STREAM_ACTIVATE_REPORT(
                region.stream_id, stream.unique_id, REPORT_WINDOW, REPORT_TIMEOUT_MS))
        with self.display.lock:
            self.channel.view.stream_mask = region.tile_mask(self.display.width, self.display.height)
        log.info("%s: stream %d %dx%d at %d,%d as %s (%s) at %d fps", self.conn.peer, region.stream_id,
                 region.width, region.height, region.x, region.y, entry, encoder.element, fps)

    def _pixel_format(self) -> str:
        scanout = self.display.scanout
        return scanout.gst_format if scanout is not None else "BGRx"

    def _flip_rows(self) -> bool:
        """Whether this client's encoder turns a bottom-up scanout the right way up: only for
        browsers (spice-html5 draws streams top-down whatever the flag says)."""
        scanout = self.display.scanout
        return scanout is not None and not scanout.y0_top and self.conn.ws is not None

    def _create_encoder(self, entry: CodecEntry, region: StreamRegion, bit_rate: int, fps: int,
                        pixel_format: str = "BGRx", shared: bool = True) -> Subscription:
        """Join the encoder other clients use for this region and codec, or start one."""
        loop_thread = threading.get_ident()  # this runs on the server's loop

        def on_frame(frame: EncodedFrame) -> None:
            # From the encoder's thread, or from this loop's for an encoder that works inline
            # (the built-in MJPEG's small frames). Inline, a frame of our own offer is sent
            # once that offer is complete (feed); another client's, on the loop's next turn.
            # Either way the self-pipe is not written.
            if threading.get_ident() != loop_thread:
                self._loop.call_soon_threadsafe(self._send_frame, sub, frame)
            elif self._offering:
                self._encoded_inline.append((sub, frame))
            else:
                self._loop.call_soon(self._send_frame, sub, frame)

        def on_error(message: str) -> None:  # any thread
            self._loop.call_soon_threadsafe(self._encoder_failed, sub, message)

        flip = self._flip_rows()
        dmabuf = self.display.scanout is not None

        def make(hub_on_frame, hub_on_error) -> VideoEncoder:
            return self.codecs.create(entry, region.width, region.height, bit_rate, hub_on_frame,
                                      hub_on_error, fps, pixel_format, flip, dmabuf)

        key = (entry, region.stream_id, region.rect, pixel_format, flip, dmabuf)
        sub = self.core.encoders.subscribe(key, make, on_frame, on_error, shared=shared)
        return sub

    def end(self, lossless: bool) -> None:
        """STREAM_DESTROY; with `lossless`, the area is then re-sent as exact pixels."""
        stream, self.active = self.active, None
        if stream is None:
            return
        stream.encoder.close()
        self.display.draws.remove_consumer(self)
        self.last_rate = stream.rate
        stream.stats = self._stats_of(stream)
        self.history = (self.history + [stream.stats])[-8:]
        if not self.conn.closed:
            self.conn.send(SERVER.DISPLAY_STREAM_DESTROY(stream.region.stream_id))
        view = self.channel.view
        with self.display.lock:
            view.stream_mask = None
            if lossless:
                view.damage.add_rect(*stream.region.rect)

    @property
    def waiting_frame(self) -> bool:
        """A frame waits to be fed (the encoder, the socket or the rate had no room)."""
        return self.active is not None and self.active.ledger.waiting_frame

    def close(self) -> None:
        stream, self.active = self.active, None
        if stream is not None:
            stream.encoder.close()
        self.display.draws.remove_consumer(self)

    # -- frames ----------------------------------------------------------------------------
    def feed(self) -> None:
        """Hand the newest frame to the encoder, or skip it (counted, with the reason).

        Frames are skipped *before* encoding while the link is congested, the socket is full
        or the encoder is busy, so nothing queues up behind a slow client."""
        stream = self.active
        if stream is None:
            return
        self._flush_held(stream)
        frame, generation, published = self.display.current()
        scanout = frame if hasattr(frame, "drm_fourcc") else None
        if scanout is None and self.display.scanout is not None:
            return  # the scanout is being replaced
        self._offering = True
        try:
            if self._offer(stream, frame, generation, published):
                scanout = None  # handed to the encoder, which releases it
        finally:
            self._offering = False
            if scanout is not None:
                scanout.release()
        while self._encoded_inline:
            self._send_frame(*self._encoded_inline.pop(0))

    def _offer(self, stream: ActiveStream, frame, generation: int, published: float) -> bool:
        """Encode `frame` if it is new and there is room; True if the encoder took it."""
        if generation == stream.generation:
            return False
        ledger = stream.ledger
        ledger.seen(generation)
        now = self.core.clock()
        encoder = stream.encoder
        reason = admit(self.conn.can_send, stream.held is not None,
                       encoder.in_flight >= encoder.max_in_flight, stream.rate, now)
        if reason is not None:
            ledger.waiting(generation, reason)
            return False
        r = stream.region
        scanout = hasattr(frame, "drm_fourcc")
        size = (frame.height, frame.width) if scanout else frame.shape[:2]
        picture = frame if scanout else frame[r.y : r.y + r.height, r.x : r.x + r.width]
        if (size != (self.display.height, self.display.width) or (scanout and size != (r.height, r.width))
                or (not scanout and picture.shape[:2] != (r.height, r.width))):
            ledger.waiting(generation, "resized")  # the next sync() ends this stream
            return False
        if wants_key_frame(now, stream.last_fed, stream.generation >= 0):
            encoder.force_key_frame()  # the client has waited: give it a fresh start
        # Encoders carry the capture time (for stats and the producer's completions); the
        # stamp is made per client when the frame is written (one encode may serve several).
        if not encoder.encode(picture, self.core.mm_time_at(published), generation, published):
            ledger.waiting(generation, "encoder busy")
            return scanout  # a refused scanout was released by the encoder
        stream.generation, stream.last_fed = generation, now
        ledger.encoded_one(generation)
        return True

    def _send_frame(self, encoder: VideoEncoder, frame: EncodedFrame) -> None:
        stream = self.active
        if stream is None or stream.encoder is not encoder or self.conn.closed:
            return  # a frame of a stream that has ended since
        meta = encoder.frame_meta(frame.timestamp_ms)
        if meta is not None and meta[1] is not None:
            stream.encode_latency.observe(self.core.clock() - meta[1])
        if self.display.scanout is not None and meta is not None:
            # The encoder has read the input: this client has what it needs from every draw
            # up to that frame, whatever happens to the encoded bytes now.
            self.display.draws.consumed(self, meta[0])
        ledger = stream.ledger
        if stream.awaiting_key:
            if not frame.key:
                ledger.dropped_after_encoding("awaiting key frame")
                return
            stream.awaiting_key = False
        if stream.held is not None:
            # The socket did not take the previous frame: the newer one supersedes it. Video
            # codecs then need a key frame before anything decodes again.
            ledger.dropped_after_encoding("superseded")
            stream.held = None
            if not frame.key and stream.entry.codec != Codec.MJPEG:
                stream.awaiting_key = True
                ledger.dropped_after_encoding("awaiting key frame")
                self._need_key(stream)
                return
        stream.held = frame
        stream.held_meta = meta
        self._flush_held(stream)
        if ledger.waiting_frame:
            self.channel.writable()  # room in the encoder again: feed the frame that waited

    def _flush_held(self, stream: ActiveStream) -> None:
        frame = stream.held
        if frame is None or not self.conn.can_send:
            return
        stream.held = None
        now = self.core.clock()
        mm = self.core.mm_ms(now)
        stamp = self.playout.stamp(mm)
        # The lead this frame got (a negative one, for a client whose clock lags, counts as 0).
        stream.playout_delay.observe((self.playout.last_stamp - mm) / 1000)
        self.conn.send(self._data_message(stream.region, stamp, frame, frame.data))
        if frame.follow_up is not None:
            # Sent at once, in the same write: it lets the client show `frame` now.
            self.conn.send(self._data_message(stream.region, self.playout.stamp(mm), frame,
                                              frame.follow_up))
            stream.ledger.follow_ups += 1
        self.conn.flush()
        stream.ledger.sent_one()
        stream.bytes_sent += len(frame.data)
        stream.rate.on_sent(now, len(frame.data))
        stream.copied_bytes += frame.copied_bytes
        meta = stream.held_meta
        stream.recent.append({"stamp": stamp, "capture": meta[1] if meta else None,
                              "generation": meta[0] if meta else None, "written": now,
                              "size": len(frame.data), "key": frame.key,
                              "buffered": self.conn.transport.get_write_buffer_size()})

    def _data_message(self, r: StreamRegion, stamp: int, frame: EncodedFrame, data: bytes):
        if self.sized:
            dest = Rect(top=r.y, left=r.x, bottom=r.y + r.height, right=r.x + r.width)
            return SERVER.DISPLAY_STREAM_DATA_SIZED(r.stream_id, stamp, frame.width, frame.height,
                                                    dest, data)
        return SERVER.DISPLAY_STREAM_DATA(r.stream_id, stamp, data)

    # -- rate control ------------------------------------------------------------------------
    def control_tick(self, now: float) -> None:
        """Periodic (server tick): sample the transport, retune the encoder, make a codec
        switch that had to wait."""
        if self.switches.pending:
            if not self._wants_switch():
                self.switches.pending = False  # the client came back to what it has
            elif self.switches.due(now):
                self.end(lossless=False)
                self.channel.writable()
        stream = self.active
        if stream is None or self.conn.closed:
            return
        info = tcpinfo.read(self.conn.transport.get_extra_info("socket"), self.conn.is_tcp)
        queue = self.conn.transport.get_write_buffer_size()
        if info is not None:
            queue += info.notsent_bytes
            changed = stream.rate.on_sample(now, queue, info.bytes_acked, info.rtt_us / 1000,
                                            info.min_rtt_us / 1000, info.unacked_segments > 0)
        else:
            changed = stream.rate.on_sample(now, queue)
        if changed:
            self._apply_rate(stream)
        self._tune_quality(stream)

    def _apply_rate(self, stream: ActiveStream) -> None:
        if stream.encoder.set_bit_rate(stream.rate.target) and stream.encoder.shared_by > 1:
            self._demote(stream, "its link is far slower than the other clients'")

    def _need_key(self, stream: ActiveStream) -> None:
        """This client lost a frame. On a shared encoder, one that keeps losing frames gets an
        encoder of its own rather than costing everyone key frames."""
        now = self.core.clock()
        stream.key_requests = [t for t in stream.key_requests if now - t < KEY_REQUEST_WINDOW_S] + [now]
        if stream.encoder.shared_by > 1 and len(stream.key_requests) >= KEY_REQUESTS_TO_DEMOTE:
            self._demote(stream, "it keeps missing frames")
        else:
            stream.encoder.force_key_frame()

    def _demote(self, stream: ActiveStream, why: str) -> None:
        try:
            private = self._create_encoder(stream.entry, stream.region, stream.rate.target,
                                           round(stream.rate.fps), self._pixel_format(), shared=False)
        except EncoderError as exc:
            log.warning("%s: cannot give it its own encoder: %s", self.conn.peer, exc)
            return
        log.info("%s: own encoder for stream %d: %s", self.conn.peer, stream.region.stream_id, why)
        stream.encoder.close()
        stream.encoder = private
        self._restore_quality(stream)
        stream.generation, stream.awaiting_key, stream.held = -1, False, None
        stream.key_requests = []
        self.channel.writable()

    def _restore_quality(self, stream: ActiveStream) -> None:
        """A new encoder for the stream (rebuilt, or its own) starts at the quality tuned so far."""
        if stream.entry.codec == Codec.MJPEG and hasattr(stream.encoder, "set_quality"):
            stream.encoder.set_quality(QUALITY_STEPS[stream.quality.index])

    def _tune_quality(self, stream: ActiveStream) -> None:
        """MJPEG has no bit-rate target: step JPEG quality to fit the rate's per-frame budget."""
        encoder = stream.encoder
        if stream.entry.codec != Codec.MJPEG or not hasattr(encoder, "set_quality"):
            return
        index = stream.quality.update(*encoder.output_totals(), stream.rate.target / 8 / stream.rate.fps)
        if index is not None:
            encoder.set_quality(QUALITY_STEPS[index])

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
                stream.encoder = self._create_encoder(stream.entry, stream.region, stream.rate.target,
                                                      round(stream.rate.fps), self._pixel_format())
                self._restore_quality(stream)
                stream.generation = -1  # the new encoder starts with a key frame of the newest frame
                self.channel.writable()
                return
            except EncoderError as exc:
                message = str(exc)
        log.warning("%s: %s failed again (%s); switching codec", self.conn.peer, stream.entry, message)
        self._fell_back(stream.entry)
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
            self._fell_back(stream.entry)
            self.end(lossless=True)
            self.channel.writable()
            return
        stream.stats["last_report"] = message._asdict()
        self.playout.on_report(message.end_frame_mm_time, message.num_frames, message.num_drops,
                               message.last_frame_delay)
        if stream.rate.on_report(self.core.clock(), message.num_frames, message.num_drops,
                                 message.last_frame_delay):
            self._apply_rate(stream)

    def set_preferred(self, codecs: list[int], now: float | None = None) -> None:
        self.preferred = list(codecs)
        now = self.core.clock() if now is None else now
        if self._wants_switch() and self.switches.request(now):
            self.end(lossless=False)  # restart with the newly preferred codec
        self.channel.writable()

    def _fell_back(self, entry: CodecEntry) -> None:
        """`entry` is unusable for this client: the next codec in the list takes over."""
        self.failed.add(entry)
        self.core.encoder_fallbacks[str(entry)] += 1

    def _wants_switch(self) -> bool:
        return (self.active is not None
                and self.codecs.choose(self.caps, self.preferred, self.failed) != self.active.entry)

    # -- stats ---------------------------------------------------------------------------------
    def _stats_of(self, stream: ActiveStream) -> dict:
        info = stream.encoder.stats()
        info.update(stream.rate.summary())
        info.update(stream.ledger.summary())
        info.update(self.playout.summary())
        info.update(stream_id=stream.region.stream_id, codec_entry=str(stream.entry),
                    bytes_sent=stream.bytes_sent,
                    copied_bytes=stream.copied_bytes, region=stream.region.rect,
                    copied_bytes_per_frame=stream.copied_bytes / max(1, stream.ledger.sent),
                    encode_latency_hist=stream.encode_latency.snapshot(),
                    playout_delay_hist=stream.playout_delay.snapshot(),
                    last_report=stream.stats.get("last_report"))
        if stream.entry.codec == Codec.MJPEG:
            info["quality"] = QUALITY_STEPS[stream.quality.index]
        return info

    def recent_frames(self) -> list[dict]:
        """Per-frame timings (stamp, capture, written, size) of the active stream."""
        return [dict(e) for e in self.active.recent] if self.active else []

    def stats(self) -> dict:
        return {"active": self._stats_of(self.active) if self.active else None,
                "ended": list(self.history), "failed_codecs": sorted(map(str, self.failed))}
