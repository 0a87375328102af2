"""The served X server's CLIPBOARD and PRIMARY selections, bridged to SPICE clients.

An ordinary X client (xcffib, a connection and thread of its own) that plays both ICCCM
roles:
  - owner: what a SPICE client copies (server.on_clipboard) is offered to X applications as
    UTF8_STRING/STRING/TEXT/text/plain;charset=utf-8 or image/png, large values in INCR
    pieces (a requestor that stops reading is dropped after INCR_TIMEOUT_S);
  - requestor: when an X application takes a selection (XFIXES SelectionNotify), its text
    or PNG is fetched (INCR included, bounded by the server's max_clipboard) and handed to
    server.set_clipboard, which offers it to every client.
Requests from the server thread reach the bridge's thread through a pipe.

Each fetch reads a property of its own on our window, the one of FETCH_SLOTS written least
recently. A fetch we give up (too big, too slow) leaves its owner waiting to write its next
INCR piece whenever that property is deleted (some, like xclip, wait for ever), or to answer
late: in a property shared by all fetches, that would land in a later transfer. So a given-up
fetch's property is retired, and its slot gets a new name.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
import time

from ..threadname import name_this_thread

log = logging.getLogger("spicestream.x11clip")

TEXT_TARGETS = ("UTF8_STRING", "text/plain;charset=utf-8", "STRING", "TEXT")
PNG = "image/png"
MIME_TEXT = "text/plain;charset=utf-8"
SELECTIONS = ("CLIPBOARD", "PRIMARY")
FETCH_TIMEOUT_S = 5.0
INCR_TIMEOUT_S = 10.0
MAX_PIECE = 256 << 10
FETCH_SLOTS = 4
MAX_FETCH_NAMES = 256  # names retired past this many are used again (a leak stays bounded)


class X11ClipboardBridge:
    def __init__(self, display_name: str, server, max_bytes: int):
        import xcffib
        import xcffib.xfixes
        import xcffib.xproto

        self.xcffib, self.xp, self.xfixes_mod = xcffib, xcffib.xproto, xcffib.xfixes
        self.server, self.max_bytes = server, max_bytes
        self.conn = xcffib.connect(display=display_name)
        self.xfixes = self.conn(xcffib.xfixes.key)
        self.xfixes.QueryVersion(4, 0).reply()
        screen = self.conn.get_setup().roots[0]
        self.window = self.conn.generate_id()
        self.conn.core.CreateWindow(0, self.window, screen.root, -1, -1, 1, 1, 0,
                                    self.xp.WindowClass.InputOnly, screen.root_visual,
                                    self.xp.CW.EventMask, [self.xp.EventMask.PropertyChange])
        names = SELECTIONS + TEXT_TARGETS + (PNG, "TARGETS", "TIMESTAMP", "INCR", "ATOM", "INTEGER")
        cookies = {n: self.conn.core.InternAtom(False, len(n), n) for n in names}
        self.atom = {n: c.reply().atom for n, c in cookies.items()}
        self.name_of = {a: n for n, a in self.atom.items()}
        mask = (self.xfixes_mod.SelectionEventMask.SetSelectionOwner
                | self.xfixes_mod.SelectionEventMask.SelectionWindowDestroy
                | self.xfixes_mod.SelectionEventMask.SelectionClientClose)
        for name in SELECTIONS:
            self.xfixes.SelectSelectionInput(self.window, self.atom[name], mask)
        self.conn.flush()
        # Pieces of 256 KiB, as toolkits send them (a BIG-REQUESTS maximum would be 16 MiB).
        self.max_piece = min(MAX_PIECE, self.conn.get_maximum_request_length() * 4 - 1024)
        self.owned: dict[int, tuple[str, bytes]] = {}  # selection atom -> (mime, data) we offer
        self.fetch: dict | None = None  # the transfer we are reading from another owner
        # A fetch slot's property atom -> when someone last wrote it (monotonic; 0: never).
        self._names = 0
        self.written: dict[int, float] = {}
        for _ in range(FETCH_SLOTS):
            self.written[self._fetch_property()] = 0.0
        self.pending_fetch: list[int] = []
        self.sending: dict[tuple[int, int], dict] = {}  # (requestor, property) -> INCR state
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # the server's loop never waits on us
        self._requests: dict[str, tuple[str, bytes]] = {}  # selection -> newest (mime, data)
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="x11-clipboard", daemon=True)
        self._thread.start()

    # -- from the server thread -------------------------------------------------------------
    def offer(self, mime: str, data: bytes, selection: str) -> None:
        """A SPICE client copied `data`: own `selection` on the X server with it. Only the
        newest copy per selection waits for the bridge's thread."""
        with self._lock:
            if self._closed or not self._thread.is_alive():
                return
            self._requests[selection] = (mime, data)
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass
        self._thread.join(5)
        if not self._thread.is_alive():
            self.conn.disconnect()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the bridge's thread --------------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread("ss-x11clip")
        fd = self.conn.get_file_descriptor()
        try:
            while not self._stop.is_set():
                with self._lock:
                    requests, self._requests = self._requests, {}
                for selection, (mime, data) in requests.items():
                    self._own(mime, data, selection)
                while True:
                    try:
                        event = self.conn.poll_for_event()
                        if event is None:
                            break
                        self._event(event)
                    except self.xcffib.ConnectionException:
                        raise
                    except self.xcffib.XcffibException as exc:
                        # An X error for one request (a requestor's window gone before our
                        # answer): that transfer fails, the bridge goes on.
                        log.debug("X error in the clipboard bridge: %s", exc)
                self._expire(time.monotonic())
                self.conn.flush()
                ready, _, _ = select.select([fd, self._wake_r], [], [], 0.5)
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
        except self.xcffib.ConnectionException as exc:
            if not self._stop.is_set():
                log.warning("X clipboard bridge lost its connection: %s", exc)
        except Exception:
            log.exception("X clipboard bridge failed")

    def _own(self, mime: str, data: bytes, selection: str) -> None:
        atom = self.atom.get(selection.upper())
        if atom is None:
            return
        self.owned[atom] = (mime, data)
        self.conn.core.SetSelectionOwner(self.window, atom, 0)  # CurrentTime

    def _event(self, event) -> None:
        xp = self.xp
        if isinstance(event, self.xfixes_mod.SelectionNotifyEvent):
            if event.owner != self.window and event.owner != 0:
                self.owned.pop(event.selection, None)
                self._queue_fetch(event.selection, event.selection_timestamp)
        elif isinstance(event, xp.SelectionRequestEvent):
            self._answer(event)
        elif isinstance(event, xp.SelectionNotifyEvent):
            self._fetched(event)
        elif isinstance(event, xp.PropertyNotifyEvent):
            self._property(event)
        elif isinstance(event, xp.SelectionClearEvent):
            self.owned.pop(event.selection, None)

    # -- owner: serving what a SPICE client copied ------------------------------------------------
    def _targets_for(self, mime: str) -> list[int]:
        names = TEXT_TARGETS if mime == MIME_TEXT else (PNG,)
        return [self.atom["TARGETS"], self.atom["TIMESTAMP"]] + [self.atom[n] for n in names]

    def _answer(self, event) -> None:
        prop = event.property or event.target  # an obsolete requestor names no property
        owned = self.owned.get(event.selection)
        target = self.name_of.get(event.target)
        ok = False
        if owned is not None:
            mime, data = owned
            if target == "TARGETS":
                atoms = self._targets_for(mime)
                self._set(event.requestor, prop, self.atom["ATOM"], 32, struct.pack(f"={len(atoms)}I", *atoms), len(atoms))
                ok = True
            elif target == "TIMESTAMP":
                self._set(event.requestor, prop, self.atom["INTEGER"], 32, struct.pack("=I", 0), 1)
                ok = True
            elif mime == MIME_TEXT and target in TEXT_TARGETS:
                value = data.decode("utf-8", "replace").encode("latin-1", "replace") if target == "STRING" else data
                # TEXT asks for "an encoding of the owner's choice": answered as UTF8_STRING.
                kind = self.atom["UTF8_STRING"] if target == "TEXT" else event.target
                ok = self._send(event.requestor, prop, kind, value)
            elif mime == PNG and target == PNG:
                ok = self._send(event.requestor, prop, event.target, data)
        notify = self.xp.SelectionNotifyEvent.synthetic(event.time, event.requestor, event.selection,
                                                        event.target, prop if ok else 0)
        self.conn.core.SendEvent(False, event.requestor, 0, notify.pack())

    def _set(self, window: int, prop: int, kind: int, fmt: int, data: bytes, count: int) -> None:
        self.conn.core.ChangeProperty(self.xp.PropMode.Replace, window, prop, kind, fmt, count, data)

    def _send(self, window: int, prop: int, kind: int, data: bytes) -> bool:
        if len(data) <= self.max_piece:
            self._set(window, prop, kind, 8, data, len(data))
            return True
        # INCR (ICCCM 2.7.2): announce the size, then a piece each time the requestor
        # deletes the property, then an empty piece.
        self.conn.core.ChangeWindowAttributes(window, self.xp.CW.EventMask, [self.xp.EventMask.PropertyChange])
        self._set(window, prop, self.atom["INCR"], 32, struct.pack("=I", len(data)), 1)
        self.sending[(window, prop)] = {"kind": kind, "data": data, "offset": 0,
                                        "deadline": time.monotonic() + INCR_TIMEOUT_S}
        return True

    def _property(self, event) -> None:
        deleted = event.state == self.xp.Property.Delete
        key = (event.window, event.atom)
        if deleted and key in self.sending:
            state = self.sending[key]
            piece = state["data"][state["offset"]:state["offset"] + self.max_piece]
            state["offset"] += len(piece)
            state["deadline"] = time.monotonic() + INCR_TIMEOUT_S
            self._set(event.window, event.atom, state["kind"], 8, piece, len(piece))
            if not piece:
                del self.sending[key]
        elif not deleted and event.window == self.window and event.atom in self.written:
            self.written[event.atom] = time.monotonic()
            fetch = self.fetch
            if fetch is not None and fetch.get("incr") and event.atom == fetch["property"]:
                self._read_incr_piece()

    # -- requestor: fetching what an X application copied ------------------------------------------
    def _fetch_property(self) -> int:
        """A property name no slot uses (names cycle after MAX_FETCH_NAMES)."""
        while True:
            name = f"SPICESTREAM_SELECTION_{self._names % MAX_FETCH_NAMES}"
            self._names += 1
            atom = self.conn.core.InternAtom(False, len(name), name).reply().atom
            if atom not in self.written:
                return atom

    def _retire(self, prop: int) -> None:
        """`prop`'s fetch was given up: its owner may still write it; later fetches use
        another."""
        if self.written.pop(prop, None) is not None:
            self.written[self._fetch_property()] = 0.0

    def _queue_fetch(self, selection: int, timestamp: int) -> None:
        if self.fetch is not None:
            if selection not in self.pending_fetch:
                self.pending_fetch.append(selection)
            return
        prop = min(self.written, key=self.written.get)  # quiet longest: no owner is writing it
        self.written[prop] = time.monotonic()
        self.fetch = {"selection": selection, "stage": "targets", "time": timestamp, "property": prop,
                      "deadline": time.monotonic() + FETCH_TIMEOUT_S}
        self.conn.core.ConvertSelection(self.window, selection, self.atom["TARGETS"], prop, timestamp)

    def _fetched(self, event) -> None:
        fetch = self.fetch
        if fetch is None or event.selection != fetch["selection"]:
            return
        if event.property == 0:
            self._fetch_done(None)
            return
        if event.property != fetch["property"]:
            return  # an answer to a fetch given up before: not ours to read
        reply = self.conn.core.GetProperty(True, self.window, fetch["property"], 0, 0,
                                           (self.max_bytes + 3) // 4 + 1).reply()
        if fetch["stage"] == "targets":
            atoms = set(struct.unpack(f"={len(reply.value.buf()) // 4}I", reply.value.buf()[: len(reply.value.buf()) // 4 * 4]))
            names = {self.name_of.get(a) for a in atoms}
            target = next((t for t in TEXT_TARGETS if t in names), PNG if PNG in names else None)
            if target is None:
                self._fetch_done(None)
                return
            fetch.update(stage="data", target=target, mime=PNG if target == PNG else MIME_TEXT)
            self.conn.core.ConvertSelection(self.window, fetch["selection"], self.atom[target],
                                            fetch["property"], fetch["time"])
            return
        if reply.type == self.atom["INCR"]:
            fetch.update(incr=True, data=bytearray())
            return  # the pieces follow as PropertyNotify (NewValue)
        if reply.bytes_after:
            self._fetch_done(None, f"over {self.max_bytes} bytes")
            return
        self._fetch_done(reply.value.buf())

    def _read_incr_piece(self) -> None:
        fetch = self.fetch
        reply = self.conn.core.GetProperty(True, self.window, fetch["property"], 0, 0,
                                           (self.max_bytes + 3) // 4 + 1).reply()
        piece = reply.value.buf()
        if not piece:
            self._fetch_done(bytes(fetch["data"]))
            return
        fetch["data"] += piece
        fetch["deadline"] = time.monotonic() + FETCH_TIMEOUT_S
        if len(fetch["data"]) > self.max_bytes:
            fetch["incr"] = False  # the rest is ignored; the owner times out on its own
            self._fetch_done(None, f"over {self.max_bytes} bytes")

    def _fetch_done(self, data: bytes | None, why: str | None = None) -> None:
        fetch, self.fetch = self.fetch, None
        selection = self.name_of.get(fetch["selection"], "?").lower()
        if why:
            log.info("X %s selection not sent to clients: %s", selection, why)
            self._retire(fetch["property"])
        elif data is not None and fetch.get("mime"):
            if fetch["mime"] == MIME_TEXT and fetch["target"] == "STRING":
                data = data.decode("latin-1").encode()
            try:
                self.server.set_clipboard(data, fetch["mime"], selection)
            except ValueError as exc:  # ClipboardError: too big, or not a PNG after all
                log.info("X %s selection not sent to clients: %s", selection, exc)
        if self.pending_fetch:
            nxt = self.pending_fetch.pop(0)
            self._queue_fetch(nxt, 0)

    def _expire(self, now: float) -> None:
        if self.fetch is not None and now > self.fetch["deadline"]:
            self._fetch_done(None, "the owner did not answer")
        for key, state in list(self.sending.items()):
            if now > state["deadline"]:
                del self.sending[key]  # a requestor that stopped reading
