"""Run the spicestream CLI counting the Python calls each of its threads makes in a window.

    .venv/bin/python bench/callcount.py OUT.json -- serve --source x11 ...

Counting starts at SIGUSR1 and stops at SIGUSR2, which also writes OUT.json: per thread
(by Python name), the total and the functions called most, counting both Python functions
and built-ins (the profile hook's "call" and "c_call"), keyed by caller and callee. CPU time
is a noisy figure on a shared machine and per-frame Python costs its footprint (code that
runs once a frame runs cold), so the number of calls a frame is the steadier measure of how
much Python a frame runs. Threads Python did not start (GStreamer's streaming threads calling
back into Python) are not seen: the hook is installed per Python thread. The hook slows what
it counts: CPU and latency figures from a counted run mean nothing.
"""

from __future__ import annotations

import collections
import json
import signal
import sys
import threading

TOP = 40


def main() -> int:
    out, rest = sys.argv[1], sys.argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    counts: collections.Counter = collections.Counter()
    counting = False

    def name(code) -> str:
        return f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"

    def hook(frame, event, arg):
        if not counting:
            return
        if event == "call":
            back = frame.f_back
            counts[(threading.current_thread().name, name(back.f_code) if back else "-",
                    name(frame.f_code))] += 1
        elif event == "c_call":
            counts[(threading.current_thread().name, name(frame.f_code),
                    "C:" + getattr(arg, "__qualname__", repr(arg)))] += 1

    def start(_signum, _frame):
        nonlocal counting
        counts.clear()
        counting = True

    def stop(_signum, _frame):
        nonlocal counting
        counting = False
        totals: collections.Counter = collections.Counter()
        for (thread, _caller, _callee), n in counts.items():
            totals[thread] += n
        top: dict = collections.defaultdict(list)
        for (thread, caller, callee), n in counts.most_common():
            if len(top[thread]) < TOP:
                top[thread].append([caller, callee, n])
        with open(out, "w") as f:
            json.dump({"totals": dict(totals), "top": dict(top)}, f)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    threading.setprofile(hook)
    sys.setprofile(hook)
    from spicestream.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
