"""The X screen follows the client's window: RandR 1.2, as `xrandr --newmode/--addmode/
--output --mode --fb` would do it, from an X connection of its own (resize requests come on
the server thread, where the capture runs too, on a connection of its own).

Xorg with the dummy driver and Xvnc take any size up to their maximum; Xvfb's maximum is its
start size, so there a bigger request is refused, said once in the log, and the size kept.
The capture side sees the new size through RandR's ScreenChangeNotify (x11.py).

A size the X server has no mode for gets one of ours (`WxH_spicestream`); once the screen has
moved to another size, ours that are no longer in use are deleted: a window dragged wider
asks for dozens of sizes, and they would all stay listed (xrandr, the desktop's display
settings) for as long as the X server runs.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("spicestream.x11")

DPI = 96  # for the physical size RandR wants with a screen size
CONNECTED = 0  # xcb_randr_connection_t: RANDR_CONNECTION_CONNECTED
ROTATE_0 = 1


def mode_timings(width: int, height: int, refresh: int = 60) -> tuple:
    """A ModeInfo (without id and name length) the dummy driver accepts: blanking like
    CVT's reduced blanking, a dot clock for `refresh` Hz."""
    htotal, vtotal = width + 160, height + 30
    clock = min(htotal * vtotal * refresh, 0xFFFFFFFF)  # a u32 on the wire (32767-wide screens)
    return (width, height, clock, width + 48, width + 80, htotal, 0, height + 3, height + 8, vtotal)


def name_of(res, mode: int) -> bytes:
    """A mode's name from GetScreenResources(Current) (names are packed in mode order)."""
    names, offset = bytes(res.names), 0
    for info in res.modes:
        if info.id == mode:
            return names[offset : offset + info.name_len]
        offset += info.name_len
    return b""


class X11Resizer:
    """`resize(width, height)`: make the X screen that size if the X server allows it."""

    def __init__(self, display_name: str):
        import xcffib
        import xcffib.randr

        self.xcffib, self.randr_mod = xcffib, xcffib.randr
        self.display_name = display_name
        self.lock = threading.Lock()  # resizes come from the server's thread, close from another
        self.conn = None
        self.closed = False
        self._said: set[str] = set()
        self._ours: dict[int, int] = {}  # mode id we created -> the output we added it to

    def _connect(self):
        if self.conn is None:
            self.conn = self.xcffib.connect(display=self.display_name)
            self.randr = self.conn(self.randr_mod.key)
            self.randr.QueryVersion(1, 2).reply()
            self.root = self.conn.get_setup().roots[0].root
        return self.randr

    def resize(self, width: int, height: int) -> bool:
        """True if the screen is now `width` x `height`."""
        with self.lock:
            if self.closed:
                return False  # the source is going away: no new connection for it
            try:
                why = self._resize(int(width), int(height))
            except (self.xcffib.ConnectionException, OSError) as exc:
                # First: ConnectionException is an XcffibException, and a broken connection
                # must be dropped, not reused for every later resize.
                self._disconnect()  # the next resize connects again
                why = f"the X connection failed ({exc})"
            except self.xcffib.XcffibException as exc:
                why = f"the X server refused it ({type(exc).__name__})"
        if why is None:
            log.info("X screen resized to %dx%d for the client", width, height)
            return True
        if why not in self._said:  # once per reason: a window dragged wider says it once
            self._said.add(why)
            log.warning("cannot resize the X screen to %dx%d: %s; keeping its size", width, height, why)
        return False

    def _resize(self, width: int, height: int) -> str | None:
        randr = self._connect()
        root = self.root
        limits = randr.GetScreenSizeRange(root).reply()
        if not (limits.min_width <= width <= limits.max_width
                and limits.min_height <= height <= limits.max_height):
            return (f"the X server takes {limits.min_width}x{limits.min_height} to "
                    f"{limits.max_width}x{limits.max_height} (Xvfb's maximum is its start size)")
        res = randr.GetScreenResourcesCurrent(root).reply()
        output = info = None
        for candidate in res.outputs:
            candidate_info = randr.GetOutputInfo(candidate, res.config_timestamp).reply()
            if candidate_info.connection == CONNECTED and candidate_info.crtc:
                output, info = candidate, candidate_info
                break
        if output is None:
            return "it has no connected output to set a mode on"
        crtc = randr.GetCrtcInfo(info.crtc, res.config_timestamp).reply()
        if (crtc.width, crtc.height) == (width, height):
            return None
        modes = {m.id: (m.width, m.height) for m in res.modes}
        mode = next((m for m in info.modes if modes.get(m) == (width, height)), None)
        if mode is None:
            mode = next((m for m, size in modes.items() if size == (width, height)), None)
            if mode is None:
                name = f"{width}x{height}_spicestream".encode()
                mode = randr.CreateMode(root, (0, *mode_timings(width, height), len(name), 0),
                                        len(name), name).reply().mode
            randr.AddOutputModeChecked(output, mode).check()
            if name_of(res, mode).endswith(b"_spicestream") or mode not in modes:
                self._ours[mode] = output
        # Off, new screen size, on with the new mode: a CRTC may never lie outside the screen.
        off = randr.SetCrtcConfig(info.crtc, 0, res.config_timestamp, 0, 0, 0, ROTATE_0, 0, []).reply()
        if off.status != 0:
            return f"the X server would not reconfigure its output (status {off.status})"
        try:
            randr.SetScreenSizeChecked(root, width, height, width * 254 // (DPI * 10),
                                       height * 254 // (DPI * 10)).check()
            reply = randr.SetCrtcConfig(info.crtc, 0, res.config_timestamp, 0, 0, mode,
                                        crtc.rotation or ROTATE_0, 1, [output]).reply()
            failed = reply.status != 0
        except self.xcffib.XcffibException:
            failed = True
        if failed:
            # Back to what it was rather than leave the screen without an output.
            randr.SetScreenSizeChecked(root, crtc.width, crtc.height, crtc.width * 254 // (DPI * 10),
                                       crtc.height * 254 // (DPI * 10)).check()
            randr.SetCrtcConfig(info.crtc, 0, res.config_timestamp, crtc.x, crtc.y, crtc.mode,
                                crtc.rotation or ROTATE_0, len(crtc.outputs), list(crtc.outputs)).reply()
            return f"the X server refused {width}x{height}"
        self._forget_modes(keep=mode)
        # Xvfb takes every request above and keeps its size: believe only the result.
        geometry = self.conn.core.GetGeometry(root).reply()
        if (geometry.width, geometry.height) != (width, height):
            return (f"the X server kept {geometry.width}x{geometry.height} (Xvfb's screen does "
                    "not change size; Xorg with the dummy driver does)")
        return None

    def _forget_modes(self, keep: int) -> None:
        """Delete the modes we created, except `keep` (the one now in use)."""
        for mode, output in list(self._ours.items()):
            if mode == keep:
                continue
            del self._ours[mode]
            try:
                self.randr.DeleteOutputModeChecked(output, mode).check()
                self.randr.DestroyModeChecked(mode).check()
            except self.xcffib.XcffibException as exc:  # in use by another output, or gone
                log.debug("mode %d stays: %s", mode, type(exc).__name__)

    def close(self) -> None:
        """Disconnect; a resize still under way on another thread finishes first (its
        connection would be freed under it), and later ones are refused."""
        with self.lock:
            self.closed = True
            self._disconnect()

    def _disconnect(self) -> None:
        if self.conn is not None:
            try:
                self.conn.disconnect()
            finally:
                self.conn = None
