"""The browser door on the SPICE port: WebSocket upgrades carry SPICE (spice-html5, brief §1.8,
§9), and with --web plain GETs get the spice-html5 client from where Debian installs it.

WebSocket framing is the `websockets` library's sans-IO protocol; `WebSocketTransport` makes
a WebSocket look like the asyncio transport the channel connection already writes to.
"""

from __future__ import annotations

import ipaddress
import mimetypes
import os
import urllib.parse

from websockets.datastructures import Headers
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from .security import is_loopback

SPICE_HTML5_ROOT = "/usr/share/spice-html5"
MAX_REQUEST_BYTES = 16 << 10
MAX_MESSAGE_BYTES = 16 << 20  # once linked
MAX_PRELOGIN_MESSAGE_BYTES = 8 << 10  # before: a link message, an auth word, a ticket


class WebError(ValueError):
    """The web client cannot be served (spice-html5 missing)."""


class WebRoot:
    """Static files of spice-html5; "/" goes to its auto-connecting page, pre-filled for us."""

    def __init__(self, root: str = SPICE_HTML5_ROOT):
        self.root = os.path.realpath(root)
        if not os.path.isfile(os.path.join(self.root, "spice_auto.html")):
            raise WebError(f"spice-html5 is not installed in {root} (Debian package spice-html5)")

    def respond(self, path: str, host_header: str, port: int) -> Response:
        url = urllib.parse.urlsplit(path)
        if url.path in ("/", ""):
            host = host_header.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
            query = urllib.parse.urlencode({"host": host, "port": port})
            return _response(302, "Found", b"", {"Location": f"/spice_auto.html?{query}"})
        relative = urllib.parse.unquote(url.path).lstrip("/")
        if "\x00" in relative:  # no file name holds one; realpath() would raise
            return _response(400, "Bad Request", b"bad path\n", {"Content-Type": "text/plain"})
        target = os.path.realpath(os.path.join(self.root, relative))
        if not target.startswith(self.root + os.sep) or not os.path.isfile(target):
            return _response(404, "Not Found", b"not found\n", {"Content-Type": "text/plain"})
        with open(target, "rb") as f:
            body = f.read()
        kind = mimetypes.guess_type(target)[0] or "application/octet-stream"
        return _response(200, "OK", body, {"Content-Type": kind, "Cache-Control": "no-cache"})


def normalise_origin(origin: str) -> str:
    """"scheme://host[:port]" in lower case, without a default port; ValueError if `origin`
    is not one (a path, a query, a missing host)."""
    url = urllib.parse.urlsplit(origin.strip().lower())
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/") \
            or url.query or url.fragment or url.username is not None:
        raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
    port = url.port  # raises ValueError for a bad port
    default = 80 if url.scheme == "http" else 443
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{url.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def websocket_refusal(headers, served_web: bool, allowed_origins: frozenset[str], secure: bool,
                      password_set: bool = True) -> str | None:
    """Why a WebSocket upgrade is refused, or None to accept it.

    A browser says where the page that opens the WebSocket came from (Origin), and sends
    it from any page: without this check any web site the user visits could link to a
    password-less server on loopback and type into it (cross-site WebSocket hijacking).
    Accepted: the page --web serves (the same origin as this request's Host), or an origin
    the operator listed (--web-origin). A request without Origin is not from a browser page,
    which a script could not forge, and is accepted. Without --web or --web-origin the
    WebSocket door is shut."""
    if not served_web and not allowed_origins:
        return "WebSocket is off (start with --web or --web-origin)"
    origin = headers.get("Origin")
    if origin is None:
        return None
    try:
        origin = normalise_origin(origin)
    except ValueError:
        return f"bad Origin {origin[:100]!r}"
    if origin in allowed_origins:
        return None
    if served_web:
        try:
            own = normalise_origin(f"{'https' if secure else 'http'}://{headers.get('Host', '')}")
        except ValueError:
            own = None
        if origin == own:
            # Without a password only a loopback name counts as our own: a page whose DNS name
            # an attacker re-pointed at 127.0.0.1 (DNS rebinding) is "same origin" too.
            host = urllib.parse.urlsplit(own).hostname or ""
            if password_set or is_loopback(host) or _is_ip_literal(host):  # an IP cannot be re-pointed
                return None
            return f"Origin {origin!r}: a DNS name, not an address, for a server without a password"
    return f"Origin {origin!r} is not allowed (--web-origin)"


# Our pages may not be framed by another site (clickjacking the viewer) nor sniffed as
# another type.
SAFETY_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def too_large_response() -> bytes:
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _response(status: int, reason: str, body: bytes, headers: dict) -> Response:
    h = Headers({**SAFETY_HEADERS, **headers})
    h["Content-Length"] = str(len(body))
    h["Connection"] = "close"
    return Response(status, reason, h, body)


def new_protocol() -> ServerProtocol:
    # spice-html5 asks for the "binary" subprotocol; spice-server refuses any other. Frames
    # are small until the SPICE link completes (`WebSocketTransport.linked`): the parser goes
    # from the request straight into the first frame, which must not be a 16 MiB one.
    return ServerProtocol(subprotocols=["binary"], max_size=MAX_PRELOGIN_MESSAGE_BYTES)


def _set_max_message(ws: ServerProtocol, size: int) -> None:
    if not hasattr(ws, "max_message_size"):  # the name websockets has used since 15.0
        raise RuntimeError("websockets too old: no per-frame message limit to set")
    ws.max_message_size = size


def is_upgrade(request) -> bool:
    return "websocket" in request.headers.get("Upgrade", "").lower()


def data_payloads(events) -> list[bytes]:
    """The payloads of the data frames among parsed WebSocket events."""
    return [e.data for e in events if getattr(e, "opcode", None) in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT)]


class WebSocketTransport:
    """An asyncio-transport look-alike: SPICE bytes in, binary WebSocket frames out."""

    def __init__(self, raw, ws: ServerProtocol):
        self.raw, self.ws = raw, ws
        # An unauthenticated peer gets small frames only; `linked()` lifts the limit. (The
        # protocol reads this limit for every frame, before it buffers the frame's payload.)
        _set_max_message(ws, MAX_PRELOGIN_MESSAGE_BYTES)

    def closing_reason(self) -> str:
        """Why the WebSocket is no longer open: the client closed it, or we did (a frame too
        big, a protocol error)."""
        sent, received = self.ws.close_sent, self.ws.close_rcvd
        if received is None and sent is not None:
            return f"WebSocket closed: {sent.code} {sent.reason}".rstrip()
        return "WebSocket closed by the client"

    def linked(self) -> None:
        _set_max_message(self.ws, MAX_MESSAGE_BYTES)

    @property
    def open(self) -> bool:
        return self.ws.state is State.OPEN

    def write(self, data) -> None:
        if not self.open:
            return  # closing: what we would send has nowhere to go
        self.ws.send_binary(bytes(data))
        self.flush()

    def writelines(self, parts) -> None:
        self.write(b"".join(parts))

    def flush(self) -> None:
        for chunk in self.ws.data_to_send():
            if chunk:
                self.raw.write(chunk)
            else:  # the protocol wants the TCP connection closed
                self.raw.close()

    def receive(self, data: bytes) -> list[bytes]:
        """Feed raw bytes; return the payloads of the data frames that completed."""
        self.ws.receive_data(data)
        payloads = data_payloads(self.ws.events_received())
        self.flush()  # pongs, close handshakes
        return payloads

    def close(self) -> None:
        if self.open:
            self.ws.send_close()
        self.flush()
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def get_extra_info(self, name, default=None):
        return self.raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()
