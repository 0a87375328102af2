"""Files a client drops into its viewer (VD_AGENT FILE_XFER_*), received into one folder.

Every transfer is checked before a byte is accepted: a name that is a plain file name (no
folders, no `..`, no NUL or control characters), a size under the server's limit and within
the free space of the folder, and at most MAX_ACTIVE at once per client. Data goes to a
hidden temporary file of our own (O_EXCL, mode 0600) that becomes the real file only when the
last byte has arrived, under a name no other file has; a cancelled, failed or abandoned
transfer leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

from ..protocol.agent import XFER_ERROR, XFER_NOT_ENOUGH_SPACE, XferErrorType, XferStatus
from ..protocol.wire import ProtocolError

log = logging.getLogger("spicestream.filexfer")

MAX_ACTIVE = 4
FREE_SPACE_RESERVE = 64 << 20  # never fill the disk to the last byte
GROUP = "vdagent-file-xfer"
# GIO error codes (GIOErrorEnum, checked with Gio.IOErrorEnum) that go back in a detailed
# error (VDAgentFileXferStatusError, error_type GLIB_IO); spice-gtk words INVALID_FILENAME.
G_IO_ERROR_FAILED = 0
G_IO_ERROR_INVALID_FILENAME = 10
G_IO_ERROR_TOO_MANY_OPEN_FILES = 31  # more transfers at once than we take


@dataclass
class FileTransferConfig:
    directory: str
    max_size: int = 1 << 30
    promised: int = 0  # bytes still to come for every transfer accepted, all clients together


@dataclass
class Transfer:
    name: str
    size: int
    fd: int
    temp_path: str
    received: int = 0


def parse_start(data: bytes) -> tuple[str, int]:
    """(name, size) from FILE_XFER_START's key file. Raises ProtocolError if it has none."""
    text = data.split(b"\x00", 1)[0].decode("utf-8", "replace")
    group, values = None, {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1]
        elif group == GROUP and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = _unescape(value.strip())
    try:
        size = int(values["size"])
        name = values["name"]
    except (KeyError, ValueError):
        raise ProtocolError("file transfer start without a name and size") from None
    if size < 0:
        raise ProtocolError(f"file transfer of {size} bytes")
    return name, size


def _unescape(value: str) -> str:
    # GKeyFile's escapes in values: \s \n \t \r \\.
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append({"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(value[i + 1], value[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def safe_name(name: str) -> str | None:
    """The file name to use, or None when nothing usable is left: the last component of a
    path (either slash), without NUL or control characters; `.`, `..` and hidden names are
    refused rather than guessed at."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c >= " " and c != "\x7f").strip()
    if not base or base in (".", "..") or base.startswith(".") or len(base.encode()) > 255:
        return None
    return base


def unique_path(directory: str, name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    path, n = os.path.join(directory, name), 1
    while os.path.lexists(path):
        path = os.path.join(directory, f"{stem} ({n}){dot}{ext}")
        n += 1
    return path


def io_error(code: int) -> bytes:
    return XFER_ERROR.pack(XFER_ERROR.type(XferErrorType.GLIB_IO, code))


def run_inline(work: Callable[[], object], then: Callable[[object], None]) -> None:
    """The simplest `offload`: do the work here and now (tests, tools)."""
    try:
        result = work()
    except OSError as exc:
        result = exc
    then(result)


class FileReceiver:
    """One client's transfers. `status(id, result, detail)` sends FILE_XFER_STATUS.

    `offload(work, then)` runs `work()` (the blocking end of a transfer: fsync, link) away
    from the caller and calls `then(result or OSError)` back on the caller's thread: fsync
    of a large file on a slow disk takes seconds, which on the server's loop would freeze every
    client's picture and sound meanwhile."""

    def __init__(self, config: FileTransferConfig | None, status: Callable[..., None],
                 on_done: Callable[[str, str], None], peer: str,
                 offload: Callable[[Callable[[], object], Callable[[object], None]], None] = run_inline):
        self.config, self._status, self._on_done, self.peer = config, status, on_done, peer
        self._offload = offload
        self.closed = False
        self.finishing = 0  # transfers whole, being made files
        self.active: dict[int, Transfer] = {}
        self.completed = 0
        self.refused = 0

    def start(self, xfer_id: int, data: bytes) -> None:
        name, size = parse_start(data)
        if self.config is None:
            self._refuse(xfer_id, XferStatus.DISABLED, b"", "file transfer is off")
            return
        if xfer_id in self.active:
            raise ProtocolError(f"file transfer {xfer_id} started twice")
        if len(self.active) + self.finishing >= MAX_ACTIVE:  # each holds an open file
            self._refuse(xfer_id, XferStatus.ERROR, io_error(G_IO_ERROR_TOO_MANY_OPEN_FILES),
                         f"already {MAX_ACTIVE} transfers")
            return
        base = safe_name(name)
        if base is None:
            self._refuse(xfer_id, XferStatus.ERROR, io_error(G_IO_ERROR_INVALID_FILENAME),
                         f"unusable name {name!r}")
            return
        directory = self.config.directory
        try:
            free = shutil.disk_usage(directory).free - FREE_SPACE_RESERVE
        except OSError as exc:
            self._refuse(xfer_id, XferStatus.ERROR, io_error(G_IO_ERROR_FAILED), f"{directory}: {exc}")
            return
        # What transfers already accepted will still write is not free any more.
        room = max(0, min(free - self.config.promised, self.config.max_size))
        if size > room:
            # spice-gtk tells its user "not enough space": the limit reads the same to them.
            self._refuse(xfer_id, XferStatus.NOT_ENOUGH_SPACE,
                         XFER_NOT_ENOUGH_SPACE.pack(XFER_NOT_ENOUGH_SPACE.type(room)),
                         f"{size} bytes, room for {room}")
            return
        try:
            fd, temp_path = tempfile.mkstemp(prefix=".spicestream-", suffix=".part", dir=directory)
        except OSError as exc:
            self._refuse(xfer_id, XferStatus.ERROR, io_error(G_IO_ERROR_FAILED), str(exc))
            return
        self.active[xfer_id] = Transfer(base, size, fd, temp_path)
        self.config.promised += size
        log.info("%s: receiving %r (%d bytes)", self.peer, base, size)
        self._status(xfer_id, XferStatus.CAN_SEND_DATA)
        if size == 0:
            self._finish(xfer_id)

    def data(self, xfer_id: int, size: int, data: bytes) -> None:
        transfer = self.active.get(xfer_id)
        if transfer is None:
            return  # cancelled or failed meanwhile: the client's data was already in flight
        if size != len(data):
            raise ProtocolError(f"file data says {size} bytes, carries {len(data)}")
        if transfer.received + size > transfer.size:
            self._fail(xfer_id, "more data than announced", G_IO_ERROR_FAILED)
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(transfer.fd, view):]
        except OSError as exc:
            self._fail(xfer_id, str(exc), G_IO_ERROR_FAILED)
            return
        transfer.received += size
        self.config.promised -= size
        if transfer.received == transfer.size:
            self._finish(xfer_id)

    def status(self, xfer_id: int, result: int) -> None:
        """The client's FILE_XFER_STATUS: it cancelled, or failed reading its file."""
        transfer = self.active.pop(xfer_id, None)
        if transfer is not None:
            log.info("%s: transfer of %r ended by the client (%s)", self.peer, transfer.name,
                     XferStatus(result).name if result in XferStatus._value2member_map_ else result)
            self._discard(transfer)

    def close(self) -> None:
        self.closed = True  # a transfer being finished still becomes a file; no status is sent
        for transfer in self.active.values():
            self._discard(transfer)
        self.active.clear()

    def _finish(self, xfer_id: int) -> None:
        transfer = self.active.pop(xfer_id)
        directory = self.config.directory
        self.finishing += 1

        def keep() -> str:  # blocking, off the caller's thread; touches only `transfer`
            os.fsync(transfer.fd)
            os.close(transfer.fd)
            transfer.fd = -1
            os.chmod(transfer.temp_path, 0o644)
            while True:
                path = unique_path(directory, transfer.name)
                try:
                    os.link(transfer.temp_path, path)  # never replaces a file that appeared
                    break
                except FileExistsError:
                    continue
            os.unlink(transfer.temp_path)
            return path

        def kept(result) -> None:  # back on the caller's thread
            self.finishing -= 1
            if isinstance(result, Exception):  # OSError, or a bug: either way no file
                self._discard(transfer)
                log.warning("%s: could not keep %r: %s", self.peer, transfer.name, result)
                if not self.closed:
                    self._status(xfer_id, XferStatus.ERROR, io_error(G_IO_ERROR_FAILED))
                return
            self.completed += 1
            log.info("%s: received %s", self.peer, result)
            if not self.closed:
                self._status(xfer_id, XferStatus.SUCCESS)
            self._on_done(os.path.basename(result), result)

        self._offload(keep, kept)

    def _fail(self, xfer_id: int, why: str, code: int) -> None:
        transfer = self.active.pop(xfer_id)
        self._discard(transfer)
        log.info("%s: transfer of %r failed: %s", self.peer, transfer.name, why)
        self._status(xfer_id, XferStatus.ERROR, io_error(code))

    def _refuse(self, xfer_id: int, result: XferStatus, detail: bytes, why: str) -> None:
        self.refused += 1
        log.info("%s: file transfer refused: %s", self.peer, why)
        self._status(xfer_id, result, detail)

    def _discard(self, transfer: Transfer) -> None:
        self.config.promised -= transfer.size - transfer.received
        transfer.received = transfer.size
        if transfer.fd >= 0:
            os.close(transfer.fd)
            transfer.fd = -1
        try:
            os.unlink(transfer.temp_path)
        except FileNotFoundError:
            pass

    def summary(self) -> dict:
        return {"active": len(self.active), "finishing": self.finishing, "completed": self.completed,
                "refused": self.refused}
