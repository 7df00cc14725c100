"""Hosts on a private network that exists only inside network namespaces.

A :class:`Network` is a "switch" namespace holding a Linux bridge, and one
namespace per host (Redis, workers), each joined to the bridge by a veth pair,
on a private /24 (10.213.N.0/24) that the machine's own namespace never sees.
:meth:`Network.cut` disables a host's port on the bridge: its frames are
dropped without a word (no RST, no ICMP unreachable; static neighbour entries
mean not even a failed ARP tells the host anything), which is what a silent
partition looks like from the host. :meth:`Network.heal` enables it again.

Path-based unix sockets cross network namespaces, so the test itself (and
beat) can talk to Redis through its unix socket while the workers use TCP.
Everything is removed by :meth:`Network.close`, also after a failed set-up.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

SUBNET_PREFIX = "10.213"  # 10.213.N.0/24, N picked per network


def netns_work() -> str | None:
    """None if network namespaces can be made here, else why not (for pytest.skip)."""
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        return "the ip and bridge commands (iproute2) are not installed"
    probe = f"pdprobe{secrets.token_hex(3)}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add failed: {exc}"
    if made.returncode != 0:
        return f"network namespaces are not permitted here: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _ip(*args: str, netns: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class NetHost:
    """One host's namespace and its address on the private network."""

    netns: str
    address: str
    port: str  # its veth end on the bridge, in the switch namespace
    mac: str

    def enter(self) -> list[str]:
        """Prefix for a command run on this host: its network and its own PID namespace."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork",
                "--mount-proc", "--kill-child"]


class Network:
    """A bridge and its hosts, all in namespaces with names unique to this network."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = f"{SUBNET_PREFIX}.{1 + secrets.randbelow(254)}"
        self.switch = f"pd{self.tag}sw"
        self.hosts: dict[str, NetHost] = {}
        self._namespaces: list[str] = []
        try:
            self._add_namespace(self.switch)
            _ip("ip", "link", "add", "br0", "type", "bridge", netns=self.switch)
            _ip("ip", "link", "set", "br0", "up", netns=self.switch)
        except Exception:
            self.close()
            raise

    def add(self, name: str) -> NetHost:
        """A host joined to the bridge: ``name`` is also its namespace's suffix."""
        index = len(self.hosts) + 1
        netns = f"pd{self.tag}{name}"
        outside, port = f"pd{self.tag}o{index}", f"pd{self.tag}p{index}"
        try:
            self._add_namespace(netns)
            _ip("ip", "link", "add", outside, "type", "veth", "peer", "name", port)
            _ip("ip", "link", "set", port, "netns", self.switch)
            _ip("ip", "link", "set", outside, "netns", netns)
        except Exception:
            subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=10)
            raise
        address = f"{self.subnet}.{index}"
        _ip("ip", "link", "set", outside, "name", "eth0", netns=netns)
        _ip("ip", "addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
        _ip("ip", "link", "set", "eth0", "up", netns=netns)
        _ip("ip", "link", "set", port, "master", "br0", netns=self.switch)
        _ip("ip", "link", "set", port, "up", netns=self.switch)
        mac = _ip("cat", "/sys/class/net/eth0/address", netns=netns).strip()
        host = NetHost(netns, address, port, mac)
        # Static neighbours both ways: a cut host never learns of the cut from ARP.
        for other in self.hosts.values():
            _ip("ip", "neigh", "replace", other.address, "lladdr", other.mac, "dev", "eth0",
                "nud", "permanent", netns=netns)
            _ip("ip", "neigh", "replace", address, "lladdr", mac, "dev", "eth0",
                "nud", "permanent", netns=other.netns)
        self.hosts[name] = host
        return host

    def cut(self, name: str) -> None:
        """Silently drop everything to and from ``name`` (its bridge port disabled)."""
        _ip("bridge", "link", "set", "dev", self.hosts[name].port, "state", "0",
            netns=self.switch)

    def heal(self, name: str) -> None:
        _ip("bridge", "link", "set", "dev", self.hosts[name].port, "state", "3",
            netns=self.switch)

    def close(self) -> None:
        """Delete every namespace (and with them their links); never raises."""
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=20)
        self._namespaces.clear()
        leftovers = [n for n in os.listdir("/run/netns") if n.startswith(f"pd{self.tag}")] \
            if os.path.isdir("/run/netns") else []
        for netns in leftovers:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=20)

    def _add_namespace(self, netns: str) -> None:
        _ip("ip", "netns", "add", netns)
        self._namespaces.append(netns)
        _ip("ip", "link", "set", "lo", "up", netns=netns)
