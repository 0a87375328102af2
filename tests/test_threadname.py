import os
import threading

from spicestream.server.api import Server
from spicestream.threadname import name_this_thread


def os_thread_names() -> set[str]:
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.add(f.read().strip())
        except OSError:  # ended meanwhile
            pass
    return names


def test_threads_carry_their_names_at_the_os_level_and_the_main_thread_keeps_its_own():
    main_name = open("/proc/self/comm").read().strip()
    named, release = threading.Event(), threading.Event()

    def body():
        name_this_thread("a-name-longer-than-fifteen-bytes")
        named.set()
        release.wait(5)

    thread = threading.Thread(target=body)
    thread.start()
    try:
        assert named.wait(5)
        assert "a-name-longer-t" in os_thread_names()  # Linux keeps 15 bytes
    finally:
        release.set()
        thread.join()
    name_this_thread("not-for-main")
    assert open("/proc/self/comm").read().strip() == main_name
    server = Server(host="127.0.0.1", port=0).start()
    try:
        assert "ss-server" in os_thread_names()  # what `top -H` and perf show for the loop
    finally:
        server.stop()
