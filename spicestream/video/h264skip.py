"""A tiny H.264 frame that lets the client show the frame before it at once.

spice-gtk gives each STREAM_DATA to `h264parse` with caps that say nothing of alignment
(brief §6.1), so the parser finds where an access unit ends only once the *next* one has begun:
every frame waits in the client for the next frame (a frame interval of latency), and the
last frame before a pause (a joiner's only frame of an idle scanout) is not shown at all.
Ending each access unit inside its own message does not help: the bytes that end it begin the
next unit, which then takes the wrong presentation time, and spice-gtk matches decoded
pictures to frames by that time.

So after each frame we send a second, separate message: an access unit delimiter (which ends
the frame before it in the parser, at a message boundary) and a *skipped picture*: one P slice,
not used for reference, whose macroblocks all copy the previous picture. It costs ~15 bytes
and no encoding, decodes to the picture already shown, and leaves the encoder's stream valid
(a non-reference picture takes the next frame_num, as the next reference picture does too).
Written only for what we can write exactly: CAVLC (x264 ultrafast), one slice group,
pic_order_cnt_type 0 with room between stamps, or 2; otherwise there is no skip frame.

Layouts: ITU-T H.264 §7.3.2.1.1 (SPS), §7.3.2.2 (PPS), §7.3.3 (slice header), §7.3.4 (slice
data: mb_skip_run), §8.2.1 (picture order count), §7.4.3 (frame_num of non-reference pictures).
"""

from __future__ import annotations

from dataclasses import dataclass

AUD = b"\x00\x00\x00\x01\x09\xf0"  # primary_pic_type 7: any slice type
HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}
NAL_SLICE, NAL_IDR, NAL_SPS, NAL_PPS = 1, 5, 7, 8
SLICE_HEADER_BYTES = 64  # more than the fields read from a slice header ever take
MAX_WRITTEN = 1024  # skipped pictures kept for reuse; (frame_num, poc) pairs recur each GOP


class Unsupported(ValueError):
    """A stream this module does not write skip frames for."""


def nal_spans(data: bytes):
    """(begin, stop) of each non-empty NAL unit of an Annex-B byte stream, start codes left
    out, found one at a time (a caller that has what it needs stops early)."""
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        begin = start + 3
        end = data.find(b"\x00\x00\x01", begin)
        stop = len(data) if end < 0 else end
        while stop > begin and data[stop - 1] == 0 and end >= 0:
            stop -= 1  # the zero that makes a four-byte start code, or trailing zeros
        if stop > begin:
            yield begin, stop
        start = end


def unescape(nal: bytes) -> bytes:
    """The RBSP of a NAL unit: emulation prevention bytes (00 00 03) removed."""
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def escape(rbsp: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class BitReader:
    """Reads bits MSB first. The data is held as one integer: each field is a shift and a
    mask, not a Python step per bit (this runs on every encoded frame)."""

    def __init__(self, data: bytes):
        self.bits, self.size, self.pos = int.from_bytes(data, "big"), 8 * len(data), 0

    def u(self, n: int) -> int:
        end = self.pos + n
        if end > self.size:
            raise Unsupported("truncated")
        self.pos = end
        return (self.bits >> (self.size - end)) & ((1 << n) - 1)

    def ue(self) -> int:
        rest = self.size - self.pos
        window = self.bits & ((1 << rest) - 1)  # the bits not yet read
        zeros = rest - window.bit_length()  # leading zeros before the first 1
        if zeros > 31:
            raise Unsupported("bad exp-Golomb code")
        if zeros >= rest:
            raise Unsupported("truncated")
        self.pos += zeros + 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


class BitWriter:
    def __init__(self):
        self.value, self.size = 0, 0

    def u(self, n: int, value: int) -> None:
        self.value = (self.value << n) | (value & ((1 << n) - 1))
        self.size += n

    def ue(self, value: int) -> None:
        length = (value + 1).bit_length()
        self.u(2 * length - 1, value + 1)  # length - 1 zeros, then value + 1 in length bits

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def rbsp(self) -> bytes:
        """The bits, rbsp_stop_one_bit, then zeros to the byte."""
        size = self.size + 1
        pad = -size % 8
        return (((self.value << 1) | 1) << pad).to_bytes((size + pad) // 8, "big")


@dataclass(frozen=True)
class Sps:
    sps_id: int
    separate_colour_plane: bool
    chroma_array_type: int
    log2_max_frame_num: int
    poc_type: int
    log2_max_poc_lsb: int
    frame_mbs_only: bool
    mbs: int  # PicSizeInMbs of a frame


@dataclass(frozen=True)
class Pps:
    pps_id: int
    sps_id: int
    bottom_field_pic_order: bool
    num_ref_idx_l0: int
    weighted_pred: bool
    deblocking_control: bool
    redundant_pic_cnt: bool


def parse_sps(rbsp: bytes) -> Sps:
    r = BitReader(rbsp[1:])
    profile = r.u(8)
    r.u(16)  # constraint flags, level
    sps_id = r.ue()
    chroma_format, separate = 1, False
    if profile in HIGH_PROFILES:
        chroma_format = r.ue()
        if chroma_format == 3:
            separate = bool(r.u(1))
        r.ue(), r.ue(), r.u(1)  # bit depths, qpprime_y_zero_transform_bypass
        if r.u(1):  # seq_scaling_matrix_present: skip the lists
            for i in range(8 if chroma_format != 3 else 12):
                if r.u(1):
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + r.se() + 256) % 256
                        last = nxt or last
    log2_max_frame_num = r.ue() + 4
    poc_type = r.ue()
    log2_max_poc_lsb = 0
    if poc_type == 0:
        log2_max_poc_lsb = r.ue() + 4
    elif poc_type == 1:
        raise Unsupported("pic_order_cnt_type 1")
    r.ue()  # max_num_ref_frames
    r.u(1)  # gaps_in_frame_num_value_allowed
    width_mbs = r.ue() + 1
    height_units = r.ue() + 1
    frame_mbs_only = bool(r.u(1))
    mbs = width_mbs * height_units * (1 if frame_mbs_only else 2)
    return Sps(sps_id, separate, 0 if separate else chroma_format, log2_max_frame_num, poc_type,
               log2_max_poc_lsb, frame_mbs_only, mbs)


def parse_pps(rbsp: bytes) -> Pps:
    r = BitReader(rbsp[1:])
    pps_id, sps_id = r.ue(), r.ue()
    if r.u(1):
        raise Unsupported("CABAC")
    bottom_field_pic_order = bool(r.u(1))
    if r.ue() != 0:
        raise Unsupported("slice groups")
    num_ref_idx_l0 = r.ue() + 1
    r.ue()  # l1
    weighted_pred = bool(r.u(1))
    r.u(2)  # weighted_bipred_idc
    r.se(), r.se(), r.se()  # pic_init_qp, pic_init_qs, chroma_qp_index_offset
    deblocking_control = bool(r.u(1))
    r.u(1)  # constrained_intra_pred
    redundant_pic_cnt = bool(r.u(1))
    return Pps(pps_id, sps_id, bottom_field_pic_order, num_ref_idx_l0, weighted_pred,
               deblocking_control, redundant_pic_cnt)


class SkipFrames:
    """Follows one encoder's H.264 output (`observe` each access unit) and writes, after it, a
    skipped picture (`after()`), or None where it cannot."""

    def __init__(self):
        self.sps: dict[int, Sps] = {}
        self.pps: dict[int, Pps] = {}
        self._last: tuple | None = None  # (pps, frame_num, poc_lsb, is_reference)
        self._written: dict[tuple, bytes | None] = {}  # _last -> after(): pictures repeat per GOP
        self.unsupported: str | None = None

    def observe(self, unit: bytes) -> None:
        self._last = None
        try:
            for begin, stop in nal_spans(unit):
                kind = unit[begin] & 0x1F
                if kind == NAL_SPS:
                    sps = parse_sps(unescape(unit[begin:stop]))
                    if self.sps.get(sps.sps_id) != sps:
                        self.sps[sps.sps_id] = sps
                        self._written.clear()
                elif kind == NAL_PPS:
                    pps = parse_pps(unescape(unit[begin:stop]))
                    if self.pps.get(pps.pps_id) != pps:
                        self.pps[pps.pps_id] = pps
                        self._written.clear()
                elif kind in (NAL_SLICE, NAL_IDR):
                    # The header is in the first bytes; the slice data is not read, nor are
                    # the picture's other slices (they share the first one's header fields).
                    header = unescape(unit[begin:min(stop, begin + SLICE_HEADER_BYTES)])
                    self._last = self._slice(header, kind == NAL_IDR, unit[begin] >> 5 & 3)
                    return
        except Unsupported as exc:
            self.unsupported, self._last = str(exc), None

    def _slice(self, rbsp: bytes, idr: bool, ref_idc: int) -> tuple:
        r = BitReader(rbsp[1:])
        r.ue()  # first_mb_in_slice
        r.ue()  # slice_type
        pps = self.pps.get(r.ue())
        sps = self.sps.get(pps.sps_id) if pps is not None else None
        if sps is None:
            raise Unsupported("slice before its parameter sets")
        if sps.separate_colour_plane:
            raise Unsupported("separate colour planes")
        frame_num = r.u(sps.log2_max_frame_num)
        if not sps.frame_mbs_only and r.u(1):
            raise Unsupported("field pictures")
        if idr:
            r.ue()  # idr_pic_id
        poc_lsb = r.u(sps.log2_max_poc_lsb) if sps.poc_type == 0 else 0
        return pps, frame_num, poc_lsb, ref_idc != 0

    def after(self) -> bytes | None:
        """AUD + a skipped, non-reference P picture to follow the last observed unit."""
        last = self._last
        if last is None:
            return None
        try:
            return self._written[last]
        except KeyError:
            pass
        if len(self._written) >= MAX_WRITTEN:
            self._written.clear()
        picture = self._written[last] = self._write(*last)
        return picture

    def _write(self, pps: Pps, frame_num: int, poc_lsb: int, reference: bool) -> bytes | None:
        sps = self.sps[pps.sps_id]
        if not reference:
            return None  # a second skip after a skip would need the same frame_num rules
        w = BitWriter()
        w.ue(0)  # first_mb_in_slice
        w.ue(5)  # slice_type: P, all slices of the picture
        w.ue(pps.pps_id)
        w.u(sps.log2_max_frame_num, (frame_num + 1) % (1 << sps.log2_max_frame_num))
        if not sps.frame_mbs_only:
            w.u(1, 0)  # field_pic_flag
        if sps.poc_type == 0:
            # Between this picture's order and the next one's: encoders that count by two
            # (x264 does) leave room; one that counts by one does not, and gets no skip.
            if poc_lsb % 2:
                return None
            w.u(sps.log2_max_poc_lsb, (poc_lsb + 1) % (1 << sps.log2_max_poc_lsb))
            if pps.bottom_field_pic_order:
                w.se(0)
        if pps.redundant_pic_cnt:
            w.ue(0)
        w.u(1, 0)  # num_ref_idx_active_override_flag
        w.u(1, 0)  # ref_pic_list_modification_flag_l0
        if pps.weighted_pred:
            w.ue(0)  # luma_log2_weight_denom
            if sps.chroma_array_type:
                w.ue(0)
            for _ in range(pps.num_ref_idx_l0):
                w.u(1, 0)
                if sps.chroma_array_type:
                    w.u(1, 0)
        # nal_ref_idc 0: no dec_ref_pic_marking. CAVLC: no cabac_init_idc.
        w.se(0)  # slice_qp_delta
        if pps.deblocking_control:
            w.ue(1)  # disable_deblocking_filter_idc: nothing here to filter
        w.ue(sps.mbs)  # mb_skip_run: every macroblock copies the reference
        return AUD + b"\x00\x00\x00\x01" + bytes([NAL_SLICE]) + escape(w.rbsp())
