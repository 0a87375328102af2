"""The capture's per-frame X requests, made on libxcb directly (ctypes), not through xcffib.

xcffib builds every request and parses every event and reply in Python, and that code runs
cold once a frame: through it the capture thread used 0.47-0.52 ms a frame, here 0.33-0.35
(bench/glass_x11.py, H.264). Here a request is a C call and an event is its 32 bytes.
Everything else (setup, cursor, input, RandR) stays on xcffib, on the same connection: both
are libxcb underneath, which hands out sequence numbers and queues events for whoever asks.

Layouts (xcb/xproto.h, xcb/shm.h, xcb/damage.h, xcb/randr.h; X protocol byte order is the
client's own, so native):
  xcb_generic_event_t          32 bytes; response_type at 0 (bit 7: sent by SendEvent)
  xcb_generic_error_t          response_type 0, error_code at 1
  xcb_damage_notify_event_t    area: x, y (int16), width, height (uint16) at 16
  xcb_randr_screen_change_notify_event_t  width, height (uint16) at 24
  xcb_shm_get_image(c, drawable, int16 x, int16 y, uint16 w, uint16 h, uint32 plane_mask,
                    uint8 format, shmseg, uint32 offset) -> cookie {unsigned int sequence}
  xcb_wait_for_reply(c, unsigned int request, xcb_generic_error_t **e) -> reply (malloc'd) or NULL
  xcb_poll_for_reply(c, unsigned int request, void **reply, xcb_generic_error_t **e) -> int:
      1 once the reply or the error is in (each malloc'd, the other NULL), 0 while it is not;
      reads the socket if nothing is queued, like xcb_poll_for_event
  xcb_flush(c) -> int (<= 0: the connection broke)
  xcb_xfixes_get_cursor_image(c) -> cookie; its reply: response_type, pad, sequence (uint16),
      length (uint32), x, y (int16), width, height, xhot, yhot (uint16), cursor_serial
      (uint32), 8 bytes of pad: 32 bytes, then width x height uint32 ARGB (premultiplied)
  xcb_get_extension_data(c, &xcb_xfixes_id): the extension's opcode, queried (a round trip)
      the first time and cached by libxcb; asked once at start so no request waits for it
"""

from __future__ import annotations

import ctypes
import struct

EVENT_SIZE = 32
DAMAGE_AREA, DAMAGE_AREA_AT = struct.Struct("=hhHH"), 16  # in a DamageNotify
CURSOR_IMAGE = struct.Struct("=8xhhHHHH12x")  # x, y, width, height, xhot, yhot; 32 bytes
SCREEN_SIZE, SCREEN_SIZE_AT = struct.Struct("=HH"), 24  # in a RandR ScreenChangeNotify
Z_PIXMAP = 2


class XcbError(Exception):
    """An X error answered a request (e.g. BadMatch for a capture of a size just gone)."""

    def __init__(self, code: int):
        super().__init__(f"X error {code}")
        self.code = code


class XcbConnectionLost(Exception):
    """libxcb reports the connection broken (the X server exited)."""


class _Cookie(ctypes.Structure):
    _fields_ = [("sequence", ctypes.c_uint)]


def _load():
    xcb = ctypes.CDLL("libxcb.so.1")
    shm = ctypes.CDLL("libxcb-shm.so.0")
    xfixes = ctypes.CDLL("libxcb-xfixes.so.0")
    xfixes.xcb_xfixes_get_cursor_image.argtypes = [ctypes.c_void_p]
    xfixes.xcb_xfixes_get_cursor_image.restype = _Cookie
    xcb.xcb_get_extension_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    xcb.xcb_get_extension_data.restype = ctypes.c_void_p
    libc = ctypes.CDLL(None)
    conn = ctypes.c_void_p
    xcb.xcb_poll_for_event.argtypes = [conn]
    xcb.xcb_poll_for_event.restype = ctypes.c_void_p
    xcb.xcb_connection_has_error.argtypes = [conn]
    xcb.xcb_connection_has_error.restype = ctypes.c_int
    xcb.xcb_poll_for_reply.argtypes = [conn, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_void_p)]
    xcb.xcb_poll_for_reply.restype = ctypes.c_int
    xcb.xcb_flush.argtypes = [conn]
    xcb.xcb_flush.restype = ctypes.c_int
    xcb.xcb_wait_for_reply.argtypes = [conn, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    xcb.xcb_wait_for_reply.restype = ctypes.c_void_p
    shm.xcb_shm_get_image.argtypes = [conn, ctypes.c_uint32, ctypes.c_int16, ctypes.c_int16,
                                      ctypes.c_uint16, ctypes.c_uint16, ctypes.c_uint32,
                                      ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint32]
    shm.xcb_shm_get_image.restype = _Cookie
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    return xcb, shm, libc, xfixes


class RawXcb:
    """The few calls the capture makes per frame, on an xcffib connection's libxcb."""

    _libs = None

    def __init__(self, xcffib_conn):
        """OSError if libxcb or libxcb-shm cannot be loaded. `_conn` is xcffib's cdata pointer
        to the xcb_connection_t (xcffib 1.x)."""
        import xcffib

        if RawXcb._libs is None:
            RawXcb._libs = _load()
        xcb, shm, libc, xfixes = RawXcb._libs
        self._c = ctypes.c_void_p(int(xcffib.ffi.cast("uintptr_t", xcffib_conn._conn)))
        xcb.xcb_get_extension_data(self._c, ctypes.byref(ctypes.c_char.in_dll(xfixes, "xcb_xfixes_id")))
        self._get_cursor_image = xfixes.xcb_xfixes_get_cursor_image
        self._poll, self._has_error = xcb.xcb_poll_for_event, xcb.xcb_connection_has_error
        self._get_image = shm.xcb_shm_get_image
        self._poll_reply, self._wait_reply, self._flush = (xcb.xcb_poll_for_reply, xcb.xcb_wait_for_reply,
                                                           xcb.xcb_flush)
        self._reply, self._error = ctypes.c_void_p(), ctypes.c_void_p()
        self._free = libc.free
        self._string_at = ctypes.string_at

    def close(self) -> None:
        """Before the xcffib connection is disconnected: no call reaches a freed connection."""
        self._c = None

    def _conn(self):
        c = self._c
        if c is None:
            raise XcbConnectionLost("closed")
        return c

    def _lost(self, c) -> XcbConnectionLost:
        return XcbConnectionLost(f"libxcb connection error {self._has_error(c)}")

    def _flushed(self, c) -> None:
        if self._flush(c) <= 0:
            raise self._lost(c)

    def _take_error(self) -> int:
        """The code of the X error xcb left in `_error` (freed)."""
        code = self._string_at(self._error.value, 2)[1]
        self._free(self._error.value)
        self._error.value = None
        return code

    def _poll_one(self, c, sequence: int) -> bool:
        """xcb_poll_for_reply into `_reply` and `_error` (the caller frees them); True once
        the reply or the error is in. XcbConnectionLost if the connection broke."""
        reply, error = self._reply, self._error
        if not self._poll_reply(c, sequence, ctypes.byref(reply), ctypes.byref(error)):
            if self._has_error(c):
                raise self._lost(c)
            return False
        if not reply.value and not error.value and self._has_error(c):  # "in": the connection broke
            raise self._lost(c)
        return True

    def poll_event(self) -> bytes | None:
        """The next queued event or error (32 bytes), None if none; XcbConnectionLost if the
        connection broke or was closed."""
        c = self._conn()
        event = self._poll(c)
        if not event:
            if self._has_error(c):
                raise self._lost(c)
            return None
        try:
            return self._string_at(event, EVENT_SIZE)
        finally:
            self._free(event)

    def request_images(self, drawable: int, seg: int, width: int, bands, stride: int) -> list[int]:
        """Ask for the full-width row bands [top, bottom) of `drawable` in the MIT-SHM segment
        `seg`, at the same rows; the requests are flushed, not waited for. Returns their
        sequence numbers, for poll_replies."""
        c = self._conn()
        sequences = [self._get_image(c, drawable, 0, top, width, bottom - top, 0xFFFFFFFF, Z_PIXMAP,
                                     seg, top * stride).sequence for top, bottom in bands]
        self._flushed(c)
        return sequences

    def poll_replies(self, sequences: list[int], errors: list[int]) -> bool:
        """Take the replies of `sequences` that are in (removed from the list, in order; the
        code of each X error appended to `errors`). True once none is left."""
        c, reply = self._conn(), self._reply
        while sequences:
            if not self._poll_one(c, sequences[0]):
                return False
            del sequences[0]
            if reply.value:
                self._free(reply.value)
                reply.value = None
            if self._error.value:
                errors.append(self._take_error())
        return True

    def request_cursor_image(self) -> int:
        """Ask for the cursor's image (XFIXES GetCursorImage), flushed; its sequence number."""
        c = self._conn()
        sequence = self._get_cursor_image(c).sequence
        self._flushed(c)
        return sequence

    def poll_cursor_image(self, sequence: int) -> tuple[bool, tuple | None]:
        """(True, (width, height, xhot, yhot, ARGB bytes)) once the reply is in, (True, None)
        if the X server refused (e.g. BadAccess for a cursor whose owner is gone), (False,
        None) while it is not in."""
        c, reply = self._conn(), self._reply
        if not self._poll_one(c, sequence):
            return False, None
        if self._error.value:
            self._take_error()
            return True, None
        if not reply.value:
            raise self._lost(c)
        try:
            _x, _y, width, height, xhot, yhot = CURSOR_IMAGE.unpack(self._string_at(reply.value, CURSOR_IMAGE.size))
            argb = self._string_at(reply.value + CURSOR_IMAGE.size, width * height * 4)
        finally:
            self._free(reply.value)
            reply.value = None
        return True, (width, height, xhot, yhot, argb)

    def wait_replies(self, sequences: list[int], errors: list[int]) -> None:
        """poll_replies, waiting for each reply (the list is left empty)."""
        c = self._conn()
        while sequences:
            reply = self._wait_reply(c, sequences.pop(0), ctypes.byref(self._error))
            if reply:
                self._free(reply)
            if self._error.value:
                errors.append(self._take_error())
            elif not reply and self._has_error(c):  # NULL without an error: the connection broke
                raise self._lost(c)
