"""The capture loop's per-frame X requests, made on libxcb directly (ctypes), not through xcffib.

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
  xcb_shm_get_image_reply(c, cookie, xcb_generic_error_t **e) -> reply (malloc'd) or NULL
"""

from __future__ import annotations

import ctypes
import struct

EVENT_SIZE = 32
DAMAGE_AREA, DAMAGE_AREA_AT = struct.Struct("=hhHH"), 16  # in a DamageNotify
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
    libc = ctypes.CDLL(None)
    conn = ctypes.c_void_p
    xcb.xcb_poll_for_event.argtypes = [conn]
    xcb.xcb_poll_for_event.restype = ctypes.c_void_p
    xcb.xcb_connection_has_error.argtypes = [conn]
    xcb.xcb_connection_has_error.restype = ctypes.c_int
    shm.xcb_shm_get_image.argtypes = [conn, ctypes.c_uint32, ctypes.c_int16, ctypes.c_int16,
                                      ctypes.c_uint16, ctypes.c_uint16, ctypes.c_uint32,
                                      ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint32]
    shm.xcb_shm_get_image.restype = _Cookie
    shm.xcb_shm_get_image_reply.argtypes = [conn, _Cookie, ctypes.POINTER(ctypes.c_void_p)]
    shm.xcb_shm_get_image_reply.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    return xcb, shm, libc


class RawXcb:
    """The few calls the capture loop makes per frame, on an xcffib connection's libxcb."""

    _libs = None

    def __init__(self, xcffib_conn):
        """OSError if libxcb or libxcb-shm cannot be loaded. `_conn` is xcffib's cdata pointer
        to the xcb_connection_t (xcffib 1.x)."""
        import xcffib

        if RawXcb._libs is None:
            RawXcb._libs = _load()
        xcb, shm, libc = RawXcb._libs
        self._c = ctypes.c_void_p(int(xcffib.ffi.cast("uintptr_t", xcffib_conn._conn)))
        self._poll, self._has_error = xcb.xcb_poll_for_event, xcb.xcb_connection_has_error
        self._get_image, self._get_image_reply = shm.xcb_shm_get_image, shm.xcb_shm_get_image_reply
        self._free = libc.free
        self._string_at = ctypes.string_at

    def close(self) -> None:
        """Before the xcffib connection is disconnected: no call reaches a freed connection."""
        self._c = None

    def poll_event(self) -> bytes | None:
        """The next queued event or error (32 bytes), None if none; XcbConnectionLost if the
        connection broke or was closed."""
        if self._c is None:
            raise XcbConnectionLost("closed")
        event = self._poll(self._c)
        if not event:
            if self._has_error(self._c):
                raise XcbConnectionLost(f"libxcb connection error {self._has_error(self._c)}")
            return None
        try:
            return self._string_at(event, EVENT_SIZE)
        finally:
            self._free(event)

    def shm_get_images(self, drawable: int, seg: int, width: int, bands, stride: int) -> None:
        """Read the full-width row bands [top, bottom) of `drawable` into the MIT-SHM segment
        `seg` at the same rows; the requests go out together (one round trip). XcbError if the
        X server refused one (the others are still collected)."""
        c, error = self._c, ctypes.c_void_p()
        if c is None:
            raise XcbConnectionLost("closed")
        cookies = [self._get_image(c, drawable, 0, top, width, bottom - top, 0xFFFFFFFF, Z_PIXMAP,
                                   seg, top * stride) for top, bottom in bands]
        code = None
        for cookie in cookies:
            reply = self._get_image_reply(c, cookie, ctypes.byref(error))
            if reply:
                self._free(reply)
            if error.value:
                code = self._string_at(error.value, 2)[1]
                self._free(error.value)
                error.value = None
        if code is not None:
            raise XcbError(code)
        if self._has_error(c):  # a reply of NULL without an error
            raise XcbConnectionLost(f"libxcb connection error {self._has_error(c)}")
