"""A small fabric of network namespaces: hosts on one switch, links that can be throttled.

    with namespace_fabric(4, logs) as fabric: # rpf<id>-host0..3 and a bridge (leaf0)
        fabric.throttle(1, "up", "100mbit")    # host1/nic0 -> leaf0 runs at 100 Mbit/s
        ranks = fabric.launch(["-m", "ray_jobs.preflight.rank", ...], ranks_per_host=2)
        codes = wait_ranks(ranks, timeout_s=300)

Host i is a namespace with `lo` and one veth end `eth0` (10.77.0.(10 + i)/24); the other end
sits in the bridge's own namespace, enslaved to the bridge `br0`: the leaf switch. A host's
uplink (hostI/nic0 -> leaf0) is the egress of its `eth0`, its downlink (leaf0 -> hostI/nic0)
the egress of its bridge-side end; `throttle` puts a tc token bucket (tbf) on either (netem
is not available here). Ranks on one host talk over its loopback: traffic to the host's own
address never leaves it. Needs root (ip netns, veth, bridge, tc). Everything is removed when
the block ends, failed or not: the rank processes first (a namespace lives on while a process
is inside it), then the namespaces, whose links go with them.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.77.0"
DIRECTIONS = ("up", "down")


class FabricError(RuntimeError):
    """A namespace command failed, or a rank process did: the message holds its output."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise FabricError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _in(namespace: str, *argv: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True,
                          text=True, timeout=30)
    if done.returncode:
        raise FabricError(f"{namespace}: {' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class RankProcess:
    """One rank launched in its host's namespace, its output in `log`."""

    rank: int
    host: int
    slot: int
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class NamespaceFabric:
    """The namespaces of one fabric (see the module docstring)."""

    hosts: int
    prefix: str
    logs: Path
    ranks: list[RankProcess] = field(default_factory=list)

    def host(self, i: int) -> str:
        """Host i's namespace."""
        return f"{self.prefix}-host{i}"

    @property
    def switch(self) -> str:
        """The bridge's namespace: leaf0."""
        return f"{self.prefix}-br0"

    @staticmethod
    def address(i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.hosts):
            ns, port = self.host(i), f"host{i}"
            _ip("netns", "add", ns)
            # gloo takes the first address of the interface it is given: IPv4 only
            _in(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                "netns", self.switch)
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")

    def throttle(self, host: int, direction: str, rate: str = "100mbit") -> None:
        """Limit host `host`'s uplink ("up": hostI/nic0 -> leaf0) or downlink ("down": leaf0 ->
        hostI/nic0) to `rate` (tc's spelling: 100mbit) with a token bucket."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: 'up' (hostI/nic0 -> leaf0) or 'down'")
        ns, dev = (self.host(host), "eth0") if direction == "up" else (self.switch, f"host{host}")
        # a burst above one 64 KiB segment (veth offloads send them whole), a queue of 5 ms
        _in(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
            "burst", "128kb", "latency", "5ms")

    def launch(self, args: Sequence[str], ranks_per_host: int, port: int = 29500,
               env: dict[str, str] | None = None) -> list[RankProcess]:
        """Start `python ARGS` once per (host, slot), rank host * ranks_per_host + slot, each in
        its host's namespace, as torch.distributed's env:// rendezvous wants them: the store on
        host0 at `port`, gloo bound to the namespace's eth0. Each also learns its place as a
        cluster file names it: RINGPILOT_NODE=host<i> and LOCAL_RANK=<slot>."""
        world = self.hosts * ranks_per_host
        for rank in range(world):
            host, slot = divmod(rank, ranks_per_host)
            log = self.logs / f"rank{rank}.log"
            rank_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT),
                        "MASTER_ADDR": self.address(0), "MASTER_PORT": str(port),
                        "RANK": str(rank), "WORLD_SIZE": str(world),
                        "RINGPILOT_NODE": f"host{host}", "LOCAL_RANK": str(slot),
                        "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
            with open(log, "w") as out:
                process = subprocess.Popen(
                    ["ip", "netns", "exec", self.host(host), sys.executable, *args],
                    cwd=ROOT, env=rank_env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            self.ranks.append(RankProcess(rank, host, slot, process, log))
        return self.ranks[-world:]

    def stop_ranks(self) -> None:
        """Kill every rank still running (its own process group) and reap it."""
        for r in self.ranks:
            if r.process.poll() is None:
                os.killpg(r.process.pid, signal.SIGKILL)
            r.process.wait(timeout=30)

    def remove(self) -> list[str]:
        """Delete every namespace of this fabric; returns the errors met (none expected)."""
        errors = []
        for ns in [self.host(i) for i in range(self.hosts)] + [self.switch]:
            if Path("/run/netns", ns).exists():
                try:
                    _ip("netns", "del", ns)
                except FabricError as e:
                    errors.append(str(e))
        return errors


def wait_ranks(ranks: Sequence[RankProcess], timeout_s: float,
               allowed: Sequence[int] = (0,)) -> list[int]:
    """Wait for every rank to exit with a status in `allowed`; their statuses in rank order,
    or FabricError with the failing ranks' output (a rank still running at the timeout is
    killed by the fabric's clean-up)."""
    codes, failed = [], []
    for r in ranks:
        try:
            code = r.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        codes.append(code)
        if code not in allowed:
            failed.append(f"rank {r.rank} (host{r.host}, slot {r.slot}): "
                          f"{'still running' if code is None else f'exit {code}'}\n"
                          f"{r.output()[-3000:]}")
    if failed:
        raise FabricError("\n".join(failed))
    return codes


@contextmanager
def namespace_fabric(hosts: int, logs: Path) -> Iterator[NamespaceFabric]:
    """A fresh fabric of `hosts` namespaces behind one bridge, under a prefix unique to this
    call (rpf<hex>); removed when the block ends, however it ends. Rank logs go to `logs`."""
    fabric = NamespaceFabric(hosts=hosts, prefix=f"rpf{secrets.token_hex(3)}", logs=Path(logs))
    try:
        fabric.build()
        yield fabric
    finally:
        fabric.stop_ranks()
        errors = fabric.remove()
        if errors:
            raise FabricError("; ".join(errors))
