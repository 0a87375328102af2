"""A test host in its own network namespace, joined to ours by a veth pair, with netem.

    with NetnsLink() as link:          # link.server_ip here, link.client_ip in the namespace
        link.shape("5mbit")
        proc = link.popen([sys.executable, "-m", ...])

The two addresses form a /30 that exists only on this veth pair: traffic to them never
leaves the machine. Each link draws its /30 from 10.199.0.0/16 at random, so that two suites
running at once do not share one. (TEST-NET-1, 192.0.2.0/24, would say so even more clearly, but this
sandbox refuses it.) Needs root and iproute2; `available()` says whether we have them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid

def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    name = f"ssprobe{uuid.uuid4().hex[:6]}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=10)


class NetnsLink:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns, self.veth_here, self.veth_there = f"ss{tag}", f"vs{tag}", f"vc{tag}"
        self.procs: list[subprocess.Popen] = []
        subnet = random.randrange(1 << 14) << 2  # a /30 of 10.199.0.0/16
        self.server_ip = f"10.199.{subnet >> 8}.{(subnet & 255) + 1}"
        self.client_ip = f"10.199.{subnet >> 8}.{(subnet & 255) + 2}"

    def __enter__(self) -> "NetnsLink":
        try:
            _run("ip", "netns", "add", self.ns)
            _run("ip", "link", "add", self.veth_here, "type", "veth", "peer", "name", self.veth_there)
            _run("ip", "link", "set", self.veth_there, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.server_ip}/30", "dev", self.veth_here)
            _run("ip", "link", "set", self.veth_here, "up")
            _run("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.client_ip}/30", "dev", self.veth_there)
            _run("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth_there, "up")
            _run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def shape(self, rate: str | None, delay: str = "20ms", queue: str = "300ms") -> str:
        """Limit our side's egress (server -> client) to `rate` (None: no limit). Uses netem
        (rate + delay) where the kernel has it; else tbf, rate only, with a `queue` of
        buffering (some kernels, this sandbox's included, lack sch_netem). Returns what it set."""
        subprocess.run(["tc", "qdisc", "del", "dev", self.veth_here, "root"], capture_output=True)
        if rate is None:
            return "none"
        netem = ["tc", "qdisc", "add", "dev", self.veth_here, "root", "netem", "rate", rate, "delay", delay]
        if subprocess.run(netem, capture_output=True).returncode == 0:
            return f"netem rate {rate} delay {delay}"
        _run("tc", "qdisc", "add", "dev", self.veth_here, "root", "tbf", "rate", rate,
             "burst", "16kb", "latency", queue)
        return f"tbf rate {rate} latency {queue} (no netem here)"

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        subprocess.run(["ip", "link", "del", self.veth_here], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def __exit__(self, *exc) -> None:
        self.close()
