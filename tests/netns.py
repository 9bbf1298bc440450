"""Separate hosts on one Linux machine: network namespaces joined by a bridge (root only).

    with NamespaceHosts(3) as hosts:        # hosts 10.<net>.0.1 .. .3, and this process's .254
        proc = hosts.spawn(1, ["python", ...], log)    # runs inside host 1's namespace
        hosts.cut(1); hosts.mend(1)                     # its link down / up again

Each host is a namespace with its own loopback and one veth interface (`eth-<i>` inside) whose
other end is on a bridge in a namespace of its own (the switch, so the machine's own firewall
and routes never see the traffic); this process reaches every host through one more veth from
the root namespace. Everything it makes carries a per-harness prefix and is removed on exit,
after a failure too: processes it spawned are killed before their namespaces go.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid


def available() -> str:
    """'' when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"msprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


class NamespaceHosts:
    def __init__(self, count: int):
        self.count = count
        self.tag = uuid.uuid4().hex[:5]
        self.net = 64 + int(self.tag, 16) % 64  # 10.<64..127>.0.0/24
        self.switch = f"ms{self.tag}sw"
        self.procs: list[subprocess.Popen] = []

    def name(self, i: int) -> str:
        return f"ms{self.tag}h{i}"

    def address(self, i: int) -> str:
        return f"10.{self.net}.0.{i + 1}"

    @property
    def own_address(self) -> str:
        return f"10.{self.net}.0.254"

    def interface(self, i: int) -> str:
        """The host's interface (inside its namespace): what UCX_NET_DEVICES names."""
        return f"eth-{i}"

    def __enter__(self) -> NamespaceHosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        run("ip", "netns", "add", self.switch)
        on_switch = ["ip", "netns", "exec", self.switch]
        run(*on_switch, "ip", "link", "add", "br0", "type", "bridge")
        run(*on_switch, "ip", "link", "set", "br0", "up")
        for i in range(self.count):
            host, outer = self.name(i), f"ms{self.tag}p{i}"
            run("ip", "netns", "add", host)
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", f"ms{self.tag}i{i}")
            run("ip", "link", "set", f"ms{self.tag}i{i}", "netns", host)
            run("ip", "-n", host, "link", "set", f"ms{self.tag}i{i}", "name", self.interface(i))
            run("ip", "link", "set", outer, "netns", self.switch)
            run(*on_switch, "ip", "link", "set", outer, "master", "br0", "up")
            run("ip", "-n", host, "addr", "add", f"{self.address(i)}/24", "dev", self.interface(i))
            run("ip", "-n", host, "link", "set", self.interface(i), "up")
            run("ip", "-n", host, "link", "set", "lo", "up")
        # this process's own way in: a veth from the root namespace to the switch
        mine = f"ms{self.tag}r"
        run("ip", "link", "add", mine, "type", "veth", "peer", "name", f"ms{self.tag}rs")
        run("ip", "link", "set", f"ms{self.tag}rs", "netns", self.switch)
        run(*on_switch, "ip", "link", "set", f"ms{self.tag}rs", "master", "br0", "up")
        run("ip", "addr", "add", f"{self.own_address}/24", "dev", mine)
        run("ip", "link", "set", mine, "up")

    def spawn(self, i: int, args: list[str], log, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """args run inside host i (its own network, this machine's files and processes)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name(i), *args], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def cut(self, i: int) -> None:
        """Host i loses its link (as a pulled cable): its interface goes down."""
        run("ip", "-n", self.name(i), "link", "set", self.interface(i), "down")

    def mend(self, i: int) -> None:
        run("ip", "-n", self.name(i), "link", "set", self.interface(i), "up")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        subprocess.run(["ip", "link", "del", f"ms{self.tag}r"], capture_output=True)
        for i in range(self.count):
            subprocess.run(["ip", "netns", "del", self.name(i)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this harness still present (none after close)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return [w for w in (names + links).split() if w.startswith(f"ms{self.tag}")]


def run(*args: str) -> None:
    out = subprocess.run(list(args), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
