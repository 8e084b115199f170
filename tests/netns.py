"""Other "hosts" on this machine for tests: Linux network namespaces joined to ours by veth pairs.

A `NetnsHost` is one namespace with one veth pair: our side gets `host_ip`, the namespace's
side `ns_ip`, on a /30 of its own inside 10.250.0.0/16. Traffic stays between this machine's
root namespace and namespaces the test made. Needs root (CI runs as root); `unavailable_reason()`
says why not otherwise, so a test can skip with that reason printed.

    with NetnsHost("gw-auth") as host:
        proc = subprocess.Popen(host.wrap(["python", "-m", "ichat.worker", ...]))
        host.link_down(); host.link_up()
        host.drop_packets(); host.restore_packets()
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """None when namespaces can be made here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{package} (`{tool}`) is not installed"
    probe = f"ichat-probe-{uuid.uuid4().hex[:6]}"
    result = _run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class NetnsHost:
    """One namespace "host" with a veth link to the root namespace.

    `name` is short (it becomes interface names, at most 15 characters with a prefix); the
    /30 is derived from a random token so that concurrent test runs do not collide.
    """

    def __init__(self, name: str) -> None:
        token = uuid.uuid4().hex[:6]
        self.ns = f"ichat-{name}-{token}"
        digest = int(hashlib.sha1(self.ns.encode()).hexdigest(), 16)
        third, fourth = (digest >> 8) % 256, (digest % 64) * 4
        self.host_ip = f"10.250.{third}.{fourth + 1}"
        self.ns_ip = f"10.250.{third}.{fourth + 2}"
        self.host_if = f"vh{token}"
        self.ns_if = f"vn{token}"
        self._made = False

    def __enter__(self) -> NetnsHost:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        _run("ip", "netns", "add", self.ns)
        self._made = True
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        self.exec("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self.exec("ip", "link", "set", self.ns_if, "up")
        self.exec("ip", "link", "set", "lo", "up")

    def destroy(self) -> None:
        if not self._made:
            return
        # Deleting the namespace removes its veth end, and with it our end of the pair.
        self.restore_packets()
        for pid in self.pids():
            _run("kill", "-9", str(pid), check=False)
        _run("ip", "link", "del", self.host_if, check=False)
        _run("ip", "netns", "del", self.ns, check=False)
        self._made = False

    def pids(self) -> list[int]:
        result = _run("ip", "netns", "pids", self.ns, check=False)
        return [int(p) for p in result.stdout.split()]

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the namespace (for subprocess.Popen or tests.procs.Proc)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(*self.wrap(argv), check=check)

    # Faults. Each cuts or restores traffic on this host's link only.
    def link_down(self) -> None:
        _run("ip", "link", "set", self.host_if, "down")

    def link_up(self) -> None:
        _run("ip", "link", "set", self.host_if, "up")

    def drop_packets(self, direction: str = "both", *, dport: int | None = None) -> None:
        """Drop this link's packets with an nftables rule in our namespace (Debian's nftables;
        this kernel has no netem): 'out' = root -> namespace, 'in' = the reverse, 'both'.
        The link stays up, so senders see silence, not an error.

        With ``dport``, only TCP packets to that port: connections opened towards it in that
        direction go silent (both ways, as TCP needs both), connections the other way stay
        fine. 'in' with the gateway's port cuts a worker's heartbeats and nothing else."""
        table = self._nft_table
        match = ["tcp", "dport", str(dport)] if dport is not None else []
        _run("nft", "add", "table", "inet", table)
        if direction in ("out", "both"):
            _run("nft", "add", "chain", "inet", table, "out", "{ type filter hook output priority 0; }")
            _run("nft", "add", "rule", "inet", table, "out", "oifname", self.host_if, *match, "drop")
        if direction in ("in", "both"):
            _run("nft", "add", "chain", "inet", table, "in", "{ type filter hook input priority 0; }")
            _run("nft", "add", "rule", "inet", table, "in", "iifname", self.host_if, *match, "drop")

    def restore_packets(self) -> None:
        _run("nft", "delete", "table", "inet", self._nft_table, check=False)

    @property
    def _nft_table(self) -> str:
        return f"ichat_{self.host_if}"
