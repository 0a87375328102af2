"""GStreamer through PyGObject, imported under one lock.

PyGObject's first import of a namespace is not thread-safe: GObject's overrides read
`GLib.Idle` while another thread may still be running GLib's, and fail with AttributeError.
It happened when the application's thread built a PulseBridge (Gst) while the server's thread
built an encoder (1 in 9 runs of tests/test_pulse_bridge.py). Every import of gi in
spicestream goes through `load`.
"""

from __future__ import annotations

import importlib
import threading

_lock = threading.Lock()


def load(*names: str) -> tuple:
    """The named gi.repository namespaces ("Gst", "GstApp", "GLib", ...), in that order, with
    Gst initialised. Raises ImportError or ValueError where PyGObject or a typelib is missing."""
    with _lock:
        import gi

        for name in names:
            if name.startswith("Gst"):
                gi.require_version(name, "1.0")
        modules = tuple(importlib.import_module(f"gi.repository.{name}") for name in names)
        if "Gst" in names:
            modules[names.index("Gst")].init(None)
    return modules
