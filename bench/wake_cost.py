"""What waking a sleeping thread costs in CPU on this machine; prints JSON.

    .venv/bin/python bench/wake_cost.py [--wakes 600] [--repeat 3]

Two measures, paced by deadline at 100 Hz:
  `asyncio_wake_us`: CPU of an idle asyncio loop's thread (from /proc/self/task) per
      `call_soon_threadsafe` of a no-op callback from another thread: how spicestream's
      server loop is woken for each frame captured and each frame encoded;
  `sleep_turn_us`: CPU of the process per turn of a `time.sleep(0.005)` loop (a timer wake).
Per-frame work in spicestream wakes its loop 2-3 times a frame (bench/glass_x11.py's
`server_threads`), so on a machine where these are tens of microseconds, wake-ups alone are a
visible share of the server's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time


def thread_cpu_s(tid: int) -> float:
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def asyncio_wake_us(wakes: int) -> float:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    time.sleep(0.2)
    cpu0, t0 = thread_cpu_s(thread.native_id), time.monotonic()
    for k in range(wakes):
        time.sleep(max(0.0, t0 + k / 100 - time.monotonic()))
        loop.call_soon_threadsafe(lambda: None)
    time.sleep(0.05)
    used = thread_cpu_s(thread.native_id) - cpu0
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
    return used / wakes * 1e6


def sleep_turn_us(turns: int) -> float:
    cpu0 = time.process_time()
    for _ in range(turns):
        time.sleep(0.005)
    return (time.process_time() - cpu0) / turns * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wakes", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [{"asyncio_wake_us": round(asyncio_wake_us(args.wakes)),
             "sleep_turn_us": round(sleep_turn_us(args.wakes // 2))} for _ in range(args.repeat)]
    print(json.dumps({"cores": os.cpu_count(), "wakes": args.wakes, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
