"""Give the calling thread its Python name at the OS level too, so `top -H`, `ps -L`, perf and
/proc/PID/task show which of spicestream's threads spends the CPU (GStreamer's threads already
carry their element names there; ours would all read "spicestream")."""

from __future__ import annotations

import ctypes
import threading

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def name_this_thread(name: str | None = None) -> None:
    """Name the calling (non-main) thread `name` (default: its Python name), cut to the 15
    bytes Linux keeps. The main thread keeps the process's name: tools find us by it."""
    if threading.current_thread() is threading.main_thread():
        return
    text = (name or threading.current_thread().name).encode("utf-8", "replace")[:15]
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
