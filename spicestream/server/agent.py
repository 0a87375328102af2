"""spicestream as the SPICE agent: one `Agent` per client's main channel.

It speaks VD_AGENT (protocol/agent.py) over the main channel's AGENT_DATA messages: announces
its capabilities, moves clipboards both ways, turns a client's MONITORS_CONFIG into the
application's `on_resize`, and receives files (filexfer.py). The server-wide clipboard lives
in `ClipboardBoard` on the core; every agent offers what is on it to its client.

Flow control (brief §4): the client may send as many AGENT_DATA messages as we granted tokens
(AGENT_WINDOW in MAIN_INIT, topped up with AGENT_TOKEN as we consume them; one beyond that is
a protocol error), and we send no more than it granted us (AGENT_START, AGENT_TOKEN): chunks
wait in a queue bounded in bytes, where a newer clipboard supersedes an older one.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..protocol.agent import (
    MAX_CHUNK,
    AgentCap,
    AgentCodec,
    AgentMsg,
    AgentStream,
    BODY_LIMITS,
    ClipboardType,
    DEFAULT_LIMIT,
    Reply,
    Selection,
    caps_of,
    caps_words,
    monitors_of,
    u32_list,
)
from ..protocol.messages import SERVER
from ..protocol.wire import ProtocolError
from .filexfer import FileReceiver, run_inline

if TYPE_CHECKING:
    from .core import ServerCore

log = logging.getLogger("spicestream.agent")

AGENT_WINDOW = 10  # tokens granted in MAIN_INIT (spice-server's REDS_AGENT_WINDOW_SIZE)
TOKENS_TO_SEND = 5  # return consumed tokens in bunches (REDS_TOKENS_TO_SEND)
MAX_IMAGE_PIXELS = 8192 * 8192  # a client's BMP/TIFF/JPEG is decoded only up to this size

MIME_TEXT = "text/plain;charset=utf-8"
MIME_PNG = "image/png"
MIME_OF = {ClipboardType.UTF8_TEXT: MIME_TEXT, ClipboardType.IMAGE_PNG: MIME_PNG}
TYPE_OF = {MIME_TEXT: ClipboardType.UTF8_TEXT, MIME_PNG: ClipboardType.IMAGE_PNG}
# What we ask a client for when it offers several: text first, then lossless images.
REQUEST_ORDER = (ClipboardType.UTF8_TEXT, ClipboardType.IMAGE_PNG, ClipboardType.IMAGE_BMP,
                 ClipboardType.IMAGE_TIFF, ClipboardType.IMAGE_JPG)
SELECTION_NAMES = {"clipboard": Selection.CLIPBOARD, "primary": Selection.PRIMARY}

OUR_CAPS = frozenset({
    AgentCap.MONITORS_CONFIG, AgentCap.REPLY, AgentCap.CLIPBOARD_BY_DEMAND,
    AgentCap.CLIPBOARD_SELECTION, AgentCap.MONITORS_CONFIG_POSITION, AgentCap.MAX_CLIPBOARD,
    AgentCap.FILE_XFER_DETAILED_ERRORS, AgentCap.CLIPBOARD_NO_RELEASE_ON_REGRAB,
    AgentCap.CLIPBOARD_GRAB_SERIAL, AgentCap.GUEST_LINEEND_LF,
})


class ClipboardError(ValueError):
    """Clipboard data the server refuses (unknown type, over the size limit)."""


def to_png(data: bytes) -> bytes:
    """A client's BMP/TIFF/JPEG clipboard image as PNG (Pillow). Its size is read from the
    header first: a few compressed megabytes can claim gigabytes of pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"a {width}x{height} image (at most {MAX_IMAGE_PIXELS} pixels)")
        image.load()
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


@dataclass
class Offer:
    """What one selection holds: its type, its bytes, and the agent it came from (None: the
    application)."""
    kind: ClipboardType
    data: bytes
    origin: "Agent | None" = None


class ClipboardBoard:
    """The server's clipboard, per selection, shared by every client's agent."""

    def __init__(self, core: "ServerCore", max_bytes: int):
        self.core, self.max_bytes = core, max_bytes
        self.offers: dict[Selection, Offer] = {}

    def set(self, selection: Selection, kind: ClipboardType | None, data: bytes,
            origin: "Agent | None") -> None:
        """New content (None: cleared), from the application or a client; every other
        client is offered it (or told it is gone)."""
        if kind is None:
            self.offers.pop(selection, None)
        else:
            self.offers[selection] = Offer(kind, data, origin)
        for agent in self.core.agents():
            if agent is not origin:
                agent.offer(selection, None if kind is None else kind)

    def released_by(self, agent: "Agent", selection: Selection) -> None:
        offer = self.offers.get(selection)
        if offer is not None and offer.origin is agent:
            self.set(selection, None, b"", agent)

    def forget(self, agent: "Agent") -> None:
        for selection, offer in list(self.offers.items()):
            if offer.origin is agent:
                offer.origin = None  # the content stays: the client that copied it has left


def off_the_loop(work, then) -> None:
    """FileReceiver's offload: `work` in the loop's default executor, `then(result or the
    exception)` back on the loop. Without a running loop (a tool driving an Agent directly),
    inline."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        run_inline(work, then)
        return

    def done(future) -> None:
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - reported through `then`, never lost
            result = exc
        then(result)

    loop.run_in_executor(None, work).add_done_callback(done)


class Agent:
    def __init__(self, core: "ServerCore", conn, peer: str):
        self.core, self.conn, self.peer = core, conn, peer
        self.codec = AgentCodec()
        self.client_caps: set[int] = set()
        self.started = False
        self.tokens_from_client = 0  # AGENT_DATA we may still send
        self.tokens_granted = AGENT_WINDOW  # AGENT_DATA the client may still send
        self.consumed = 0  # since the last AGENT_TOKEN we sent
        self.queue: collections.deque = collections.deque()  # (message seq, selection, chunk)
        self.queued_bytes = 0
        self._seq = 0
        self._sending: int | None = None  # the message partly sent, if any
        self._queued_offer: dict[Selection, tuple[int, object]] = {}  # selection -> (seq, Offer)
        # A client copying more than we take is no attack: its clipboard is read past.
        self.stream = AgentStream(self._limit_of, lambda kind: kind == AgentMsg.CLIPBOARD)
        # GRAB_SERIAL: one counter per selection shared with the client, as spice-vdagent
        # keeps it: each GRAB, from either side, carries it and moves it on (_client_grab).
        self.serial = {s: 0 for s in Selection}
        self.client_grabs: dict[Selection, list[int]] = {}
        self.client_max_clipboard = -1  # the client's own limit (MAX_CLIPBOARD); -1: none
        self.files = FileReceiver(core.file_transfer, self._file_status, core.emit_file, peer,
                                  offload=off_the_loop)
        self.stats = collections.Counter()

    # -- limits -------------------------------------------------------------------------------
    def _limit_of(self, kind: int) -> int:
        if kind == AgentMsg.CLIPBOARD:
            return 8 + self.core.clipboard.max_bytes
        return BODY_LIMITS.get(kind, DEFAULT_LIMIT)

    # -- main channel messages -----------------------------------------------------------
    def start(self, num_tokens: int) -> None:
        """AGENT_START: the client's window for what we send; we announce ourselves."""
        self.started = True
        self.tokens_from_client = num_tokens
        self._announce(request=False)  # clients announce theirs with request=1 anyway

    def data(self, chunk: bytes) -> None:
        """AGENT_DATA from the client: one token spent; complete messages are handled."""
        if self.tokens_granted <= 0:
            raise ProtocolError("agent data beyond the tokens granted")
        self.tokens_granted -= 1
        self.consumed += 1
        if self.consumed >= TOKENS_TO_SEND:
            self.conn.send(SERVER.MAIN_AGENT_TOKEN(self.consumed))
            self.tokens_granted += self.consumed
            self.consumed = 0
        for kind, body in self.stream.feed(chunk):
            if body is None:
                self.stats["clipboard_over_limit"] += 1
                log.info("%s: a clipboard over --max-clipboard (%d bytes) was not taken", self.peer,
                         self.core.clipboard.max_bytes)
                continue
            message = self.codec.unpack(kind, body)
            self.stats[AgentMsg(kind).name if kind in AgentMsg._value2member_map_ else "unknown"] += 1
            if message is not None:
                self._handle(AgentMsg(kind), message)

    def token(self, num_tokens: int) -> None:
        self.tokens_from_client = min(self.tokens_from_client + num_tokens, 0xFFFFFFFF)
        self._pump()

    def closed(self) -> None:
        self.files.close()
        self.core.clipboard.forget(self)
        self.queue.clear()

    # -- sending ----------------------------------------------------------------------------
    def send(self, kind: AgentMsg, selection: Selection | None = None, **fields) -> None:
        """Queue one agent message. Clipboard data supersedes that of the same selection
        still waiting, unless it has begun to go out (a message, once started, ends)."""
        if not self.started:
            return
        packed = self.codec.pack(kind, self.codec.make(kind, selection=selection, **fields)
                                 if selection is not None else self.codec.make(kind, **fields))
        self._seq += 1
        key = selection if kind == AgentMsg.CLIPBOARD else None
        if key is not None:
            self._drop_unsent(key)
        view = memoryview(packed)
        for i in range(0, max(len(packed), 1), MAX_CHUNK):
            part = view[i:i + MAX_CHUNK]
            self.queue.append((self._seq, key, part))
            self.queued_bytes += len(part)
        self._pump()
        # Three clipboards' worth (both selections and one being replaced) and some slack: a
        # client that takes none of it is stalled, and goes.
        limit = 3 * self.core.clipboard.max_bytes + (1 << 20)
        if self.queued_bytes > limit and not self.conn.closed:
            self.queue.clear()
            self.queued_bytes = 0
            self.conn.abort(f"agent: {limit} bytes waiting for a client that does not read them")

    def _drop_unsent(self, selection: Selection) -> None:
        kept = collections.deque()
        for entry in self.queue:
            seq, key, part = entry
            if key == selection and seq != self._sending:
                self.queued_bytes -= len(part)
                self.stats["clipboard_superseded"] += 1
            else:
                kept.append(entry)
        self.queue = kept

    def _pump(self) -> None:
        """Send what the client's tokens and our socket allow (the rest waits, bounded)."""
        while self.queue and self.tokens_from_client > 0 and self.conn.can_send:
            seq, _, part = self.queue.popleft()
            self._sending = seq if self.queue and self.queue[0][0] == seq else None
            self.queued_bytes -= len(part)
            self.tokens_from_client -= 1
            self.conn.send(SERVER.MAIN_AGENT_DATA(part))
        self.conn.flush()

    def _announce(self, request: bool) -> None:
        caps = OUR_CAPS if self.core.file_transfer is not None else OUR_CAPS | {AgentCap.FILE_XFER_DISABLED}
        self.send(AgentMsg.ANNOUNCE_CAPABILITIES, request=int(request), caps=caps_words(caps))

    # -- agent messages -------------------------------------------------------------------
    def _handle(self, kind: AgentMsg, message) -> None:
        if kind == AgentMsg.ANNOUNCE_CAPABILITIES:
            first = not self.client_caps
            self.client_caps = caps_of(message.caps)
            self.codec = AgentCodec(self.client_caps & OUR_CAPS)
            if message.request:
                self._announce(request=False)
                self.serial = {s: 0 for s in Selection}  # a client (re)starting its agent side
            if first:  # the clipboard layout is known only now: offer what the server holds
                for selection, offer in list(self.core.clipboard.offers.items()):
                    self.offer(selection, offer.kind)
        elif kind == AgentMsg.MONITORS_CONFIG:
            self._monitors(message)
        elif kind == AgentMsg.CLIPBOARD_GRAB:
            self._client_grab(message)
        elif kind == AgentMsg.CLIPBOARD_REQUEST:
            self._client_request(message)
        elif kind == AgentMsg.CLIPBOARD:
            self._client_clipboard(message)
        elif kind == AgentMsg.CLIPBOARD_RELEASE:
            self.client_grabs.pop(self._selection(message), None)
            self.core.clipboard.released_by(self, self._selection(message))
        elif kind == AgentMsg.MAX_CLIPBOARD:
            self.client_max_clipboard = message.max
        elif kind == AgentMsg.FILE_XFER_START:
            self.files.start(message.id, message.data)
        elif kind == AgentMsg.FILE_XFER_DATA:
            self.files.data(message.id, message.size, message.data)
        elif kind == AgentMsg.FILE_XFER_STATUS:
            self.files.status(message.id, message.result)

    @staticmethod
    def _selection(message) -> Selection:
        try:
            return Selection(message.selection)
        except ValueError:
            raise ProtocolError(f"clipboard selection {message.selection}") from None

    def _monitors(self, message) -> None:
        monitors = monitors_of(message)
        self.send(AgentMsg.REPLY, type=AgentMsg.MONITORS_CONFIG, error=Reply.SUCCESS)
        active = [m for m in monitors if m.width and m.height]
        if not active:
            return
        width = max(m.x + m.width for m in active) - min(m.x for m in active)
        height = max(m.y + m.height for m in active) - min(m.y for m in active)
        self.core.emit_resize(width, height, [m._asdict() for m in monitors])

    # -- clipboard: the client's -----------------------------------------------------------
    def _client_grab(self, message) -> None:
        selection = self._selection(message)
        if AgentCap.CLIPBOARD_GRAB_SERIAL in self.codec.caps:
            # The client's grab crossed ours if it carries the serial before ours: the
            # client's wins (spice-vdagent's rule); an older one is stale.
            if message.serial == self.serial[selection]:
                self.serial[selection] += 1
            elif message.serial != (self.serial[selection] - 1) & 0xFFFFFFFF:
                self.stats["stale_grabs"] += 1
                return
        types = u32_list(message.types)
        self.client_grabs[selection] = types
        wanted = next((t for t in REQUEST_ORDER if t in types), None)
        if wanted is not None:
            self.send(AgentMsg.CLIPBOARD_REQUEST, selection=selection, type=wanted)

    def _client_clipboard(self, message) -> None:
        selection = self._selection(message)
        kind = message.type
        data = message.data
        if kind == ClipboardType.NONE or selection not in self.client_grabs:
            return  # the client had nothing after all, or released it meanwhile
        if kind in (ClipboardType.IMAGE_BMP, ClipboardType.IMAGE_TIFF, ClipboardType.IMAGE_JPG):
            try:
                data, kind = to_png(data), ClipboardType.IMAGE_PNG
            except Exception as exc:  # Pillow raises many kinds for bad images
                log.info("%s: clipboard image not understood (%s); ignored", self.peer, exc)
                return
        if kind not in MIME_OF:
            return
        if kind == ClipboardType.UTF8_TEXT:
            data = data.split(b"\x00", 1)[0]  # spice-gtk sends the text with its NUL
        self.core.clipboard.set(selection, ClipboardType(kind), data, self)
        self.core.emit_clipboard(MIME_OF[kind], data, selection.name.lower())

    # -- clipboard: ours ---------------------------------------------------------------------
    def offer(self, selection: Selection, kind: ClipboardType | None) -> None:
        """Tell the client the server's `selection` now holds `kind` (None: nothing)."""
        if not self.started or not self._can_clipboard(selection):
            return
        if kind is None:
            self.send(AgentMsg.CLIPBOARD_RELEASE, selection=selection)
            return
        serial = self.serial[selection]
        self.serial[selection] += 1
        self.send(AgentMsg.CLIPBOARD_GRAB, selection=selection, serial=serial,
                  types=ClipboardType(kind).to_bytes(4, "little"))

    def _can_clipboard(self, selection: Selection) -> bool:
        caps = self.client_caps
        if AgentCap.CLIPBOARD_BY_DEMAND not in caps:
            return False
        return selection == Selection.CLIPBOARD or AgentCap.CLIPBOARD_SELECTION in caps

    def _client_request(self, message) -> None:
        selection = self._selection(message)
        offer = self.core.clipboard.offers.get(selection)
        queued = self._queued_offer.get(selection)
        if queued is not None and queued[1] is offer and any(seq == queued[0] for seq, _, _ in self.queue):
            self.stats["requests_already_queued"] += 1
            return  # that very content is still on its way: a second copy helps nobody
        fits = (offer is not None and offer.kind == message.type
                and (self.client_max_clipboard < 0 or len(offer.data) <= self.client_max_clipboard))
        if not fits:
            self.send(AgentMsg.CLIPBOARD, selection=selection, type=ClipboardType.NONE, data=b"")
            return
        # Text goes without a NUL (spice-gtk would paste it); a request is always answered,
        # NONE included: spice-gtk waits for the answer without a timeout.
        self.send(AgentMsg.CLIPBOARD, selection=selection, type=offer.kind, data=offer.data)
        self._queued_offer[selection] = (self._seq, offer)

    # -- file transfer ---------------------------------------------------------------------
    def _file_status(self, xfer_id: int, result: int, detail: bytes = b"") -> None:
        if AgentCap.FILE_XFER_DETAILED_ERRORS not in self.client_caps:
            detail = b""
        self.send(AgentMsg.FILE_XFER_STATUS, id=xfer_id, result=result, data=detail)

    def summary(self) -> dict:
        return {"client_caps": sorted(self.client_caps), "messages": dict(self.stats),
                "queued_bytes": self.queued_bytes, "files": self.files.summary()}
