"""The sandboxed apps' network namespaces: one per app, made ahead of its launch (a slot).

Slot ``n`` is the namespace file ``/run/netns/<prefix>-<n>`` with a veth pair: ``<prefix><n>`` on
the host, with no address of its own and IPv6 off, and ``eth0`` inside with address ``4n+2/32``
of the suite's network. The host routes that one address to its veth; inside, the one route is
to the suite's gateway (the network's first address, held once by the host's ``lo``), whose
neighbour entry is the host veth's. Inside: ``lo`` up, IPv6 off, ``route_localnet`` on and one nft
rule, ``iifname "eth0" ip daddr <app address> dnat to 127.0.0.1`` (the port kept), and no default
route. So the proxy reaches an app at ``http://<app address>:<port>`` whether it listens on
127.0.0.1 or 0.0.0.0; the app reaches nothing but its own loopback (not the host's services, not
another app, not the outside).

Making or removing a slot adds or removes no address of the host: only links. Programs on the
host that watch its addresses take every change for a new network; Chromium, for one, then fails
the requests it has in flight (``ERR_NETWORK_CHANGED``), and it did in the page tests, whenever a
slot was made or an app ended while a page loaded.

The host's side is made once (:meth:`Network.prepare`): an nft table of the suite (``inet
binder_<suite>``) that drops what an app sends the host, except replies, and every packet to be
forwarded from or to an app; the gateway address; a blackhole route for the suite's network (an
address whose veth is gone is not sent to the default gateway).

Made in-process, through netlink (pyroute2) and libnftables (ctypes): 6-12 ms a namespace here
against 45-55 ms with ``ip``/``nft`` commands (measured), and no process spawned. A namespace is
made in a thread of its own, which unshares its network namespace, works in both, and goes back:
pyroute2 opens its netlink socket per thread, lazily, in the namespace the thread is in at its
first request, so the host's socket is opened before the unshare (pinned: ``pyroute2`` 0.9).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import ipaddress
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
CLONE_FILES = 0x400
FD_SETSIZE = 1024
"""libnftables waits for netlink answers with select(): a socket it opens at descriptor 1024 or
above aborts the whole process (glibc's fortify check), as a server holding a thousand
connections would make it do (:func:`nft`)."""
MS_BIND, MS_REC, MS_SHARED = 4096, 16384, 1 << 20
MNT_DETACH = 2
NUD_PERMANENT = 0x80

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetworkError(Exception):
    """A namespace or the host's rules could not be made."""


def _nft_library() -> Any:
    try:
        lib: Any = ctypes.CDLL("libnftables.so.1")
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for name in ("nft_ctx_free", "nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    return lib


_NFT = _nft_library()


def nft(commands: str) -> None:
    """Run an nft batch (atomic) in the calling thread's network namespace. Where the server's
    low descriptors are all taken (:data:`FD_SETSIZE`), in a thread of its own (which starts in
    the caller's namespace) with a descriptor table of its own, in which the copies of the
    server's low descriptors are closed first: the rest of the server keeps them."""
    if _lowest_free() < FD_SETSIZE - 64:
        _nft(commands)
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            if _LIBC.unshare(CLONE_FILES):
                raise NetworkError(f"unshare files: {os.strerror(ctypes.get_errno())}")
            for fd in range(3, FD_SETSIZE):  # copies, in this thread's table only
                with contextlib.suppress(OSError):
                    os.close(fd)
            _nft(commands)
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=run, name="nft")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def _lowest_free() -> int:
    probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(probe)
    return probe


def _nft(commands: str) -> None:
    if _NFT is None:
        raise NetworkError("libnftables.so.1 is missing: install nftables (make setup does)")
    ctx = _NFT.nft_ctx_new(0)
    try:
        _NFT.nft_ctx_buffer_output(ctx)
        _NFT.nft_ctx_buffer_error(ctx)
        if _NFT.nft_run_cmd_from_buffer(ctx, commands.encode()):
            error = (_NFT.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            raise NetworkError(f"nft: {error.strip()}")
    finally:
        _NFT.nft_ctx_free(ctx)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def suite_network(suite: str) -> ipaddress.IPv4Network:
    """The suite's own /20 (1024 slots) in 10.64.0.0/10, from its label: two suites on a host
    get different ones (unless the operator sets ``[deploy.local] sandbox_network``)."""
    index = int(hashlib.sha256(suite.encode()).hexdigest(), 16) % 1024
    base = int(ipaddress.IPv4Address("10.64.0.0")) + index * 4096
    return ipaddress.IPv4Network((base, 20))


@dataclass(frozen=True)
class Netns:
    """Slot ``n``'s namespace: its file, its host-side link, the app's address and the suite's
    gateway (the host's one address the app has a route to)."""

    n: int
    path: Path
    host_if: str
    app_addr: str
    gateway: str


class Network:
    """The suite's network namespaces; ``prefix`` names its links and files (at most 8
    characters: a link's name has at most 15), ``network`` holds their addresses."""

    def __init__(self, prefix: str, network: ipaddress.IPv4Network) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"bad network prefix {prefix!r}")
        self.prefix = prefix
        self.network = network
        self.table = f"binder_{prefix}"
        self.slots = network.num_addresses // 4
        self.gateway = str(network.network_address + 1)
        self._lock = threading.Lock()

    def netns(self, n: int) -> Netns:
        if not 0 <= n < self.slots:
            raise NetworkError(f"slot {n} is out of the suite's network {self.network}")
        base = self.network.network_address + 4 * n
        return Netns(
            n, NETNS_DIR / f"{self.prefix}-{n}", f"{self.prefix}{n}", str(base + 2), self.gateway
        )

    def existing(self) -> dict[int, int]:
        """Slot number -> inode of every namespace file of the suite (an app's process is in
        slot n's namespace when its ``/proc/<pid>/ns/net`` has that inode)."""
        out: dict[int, int] = {}
        pattern = re.compile(rf"^{self.prefix}-([0-9]{{1,6}})$")
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(NETNS_DIR):
                found = pattern.match(entry.name)
                if found:
                    with contextlib.suppress(OSError):
                        out[int(found.group(1))] = os.stat(entry.path).st_ino
        return out

    def prepare(self) -> None:
        """The host's side, once per start: ``/run/netns`` a shared mount of its own (as
        iproute2 makes it: an unmount there leaves no copy that keeps a namespace alive), the
        suite's nft table made anew, the gateway address on ``lo``, the blackhole route."""
        NETNS_DIR.mkdir(mode=0o755, exist_ok=True)
        if _LIBC.mount(b"", bytes(NETNS_DIR), b"none", MS_SHARED | MS_REC, None):
            if _LIBC.mount(bytes(NETNS_DIR), bytes(NETNS_DIR), b"none", MS_BIND | MS_REC, None):
                raise NetworkError(f"bind mount {NETNS_DIR}: {os.strerror(ctypes.get_errno())}")
            if _LIBC.mount(b"", bytes(NETNS_DIR), b"none", MS_SHARED | MS_REC, None):
                raise NetworkError(f"share {NETNS_DIR}: {os.strerror(ctypes.get_errno())}")
        p, t = self.prefix, self.table
        nft(
            f"add table inet {t}\ndelete table inet {t}\n"
            f"table inet {t} {{\n"
            " chain input {\n  type filter hook input priority -10; policy accept;\n"
            f'  iifname "{p}*" ct state established,related accept\n'
            f'  iifname "{p}*" drop\n }}\n'
            " chain forward {\n  type filter hook forward priority -10; policy accept;\n"
            f'  iifname "{p}*" drop\n  oifname "{p}*" drop\n }}\n}}\n'
        )
        self._in_host(self._host_routes, "add")

    def drop_host_side(self) -> None:
        """Remove the nft table, the gateway address and the blackhole route (when no app is
        left)."""
        with contextlib.suppress(NetworkError):
            nft(f"delete table inet {self.table}\n")
        with contextlib.suppress(NetworkError):
            self._in_host(self._host_routes, "del")

    def _host_routes(self, host: Any, action: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        lo = host.link_lookup(ifname="lo")[0]
        try:  # EEXIST on add (another server of the host, a restart), EADDRNOTAVAIL on delete
            host.addr(action, index=lo, address=self.gateway, prefixlen=32)
        except NetlinkError as exc:
            if exc.code not in (17, 99):
                raise NetworkError(f"gateway address {self.gateway}: {exc}") from exc
        self._blackhole(host, action)

    def _blackhole(self, host: Any, action: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            host.route(action, dst=str(self.network), type="blackhole")
        except NetlinkError as exc:
            if exc.code not in (17, 3):  # EEXIST on add, ESRCH on delete
                raise NetworkError(f"blackhole route {self.network}: {exc}") from exc

    def _in_host(self, work: Any, *args: Any) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as host:
            work(host, *args)

    def make(self, n: int) -> Netns:
        """Make slot ``n``'s namespace (blocking, ~10 ms; in a thread of its own)."""
        result: list[Netns | BaseException] = []
        thread = threading.Thread(target=self._make, args=(n, result), name=f"netns-{n}")
        thread.start()
        thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _make(self, n: int, result: list[Netns | BaseException]) -> None:
        from pyroute2 import IPRoute

        ns = self.netns(n)
        host = IPRoute()
        try:
            host.link_lookup(ifname="lo")  # this thread's host socket, before the unshare
            index = self._unshare_and_fill(ns, host)
            # before it is up: no link-local address comes and goes with it
            with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
                _write(f"/proc/sys/net/ipv6/conf/{ns.host_if}/disable_ipv6", "1")
            host.link("set", index=index, state="up")
            host.route("add", dst=ns.app_addr, dst_len=32, oif=index, prefsrc=ns.gateway, scope=253)
            result.append(ns)
        except BaseException as exc:  # handed to the caller's thread
            with contextlib.suppress(Exception):
                self._delete_link(host, ns)
            self.remove(ns)
            result.append(exc if isinstance(exc, NetworkError) else NetworkError(str(exc)))
        finally:
            host.close()

    def _unshare_and_fill(self, ns: Netns, host: Any) -> int:
        """Make the namespace and fill it; the host veth's index (the link still down: its IPv6
        is turned off from the host's namespace before it comes up)."""
        from pyroute2 import IPRoute

        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.close(os.open(ns.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
            if _LIBC.unshare(CLONE_NEWNET):
                raise NetworkError(f"unshare: {os.strerror(ctypes.get_errno())}")
            try:
                if _LIBC.mount(b"/proc/thread-self/ns/net", bytes(ns.path), b"none", MS_BIND, None):
                    raise NetworkError(f"bind {ns.path}: {os.strerror(ctypes.get_errno())}")
                # per-namespace sysctls resolve against the opener's namespace: this thread's
                _write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")
                _write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
                _write("/proc/sys/net/ipv4/conf/all/route_localnet", "1")
                inside = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    host.link(
                        "add",
                        ifname=ns.host_if,
                        kind="veth",
                        peer={"ifname": "eth0", "net_ns_fd": inside},
                    )
                finally:
                    os.close(inside)
                index: int = host.link_lookup(ifname=ns.host_if)[0]
                mac = host.get_links(index)[0].get_attr("IFLA_ADDRESS")
                with IPRoute() as inner:  # a socket of the new namespace
                    lo = inner.link_lookup(ifname="lo")[0]
                    eth = inner.link_lookup(ifname="eth0")[0]
                    inner.link("set", index=lo, state="up")
                    inner.addr("add", index=eth, address=ns.app_addr, prefixlen=32)
                    inner.link("set", index=eth, state="up")
                    inner.route("add", dst=ns.gateway, dst_len=32, oif=eth, scope=253)
                    # the gateway's neighbour set, not asked by ARP: a host that answers ARP only
                    # for the receiving link's own addresses (arp_ignore) would never answer
                    inner.neigh("add", dst=ns.gateway, lladdr=mac, ifindex=eth, state=NUD_PERMANENT)
                nft(
                    "table ip binder {\n chain pre {\n"
                    "  type nat hook prerouting priority dstnat; policy accept;\n"
                    f'  iifname "eth0" ip daddr {ns.app_addr} dnat to 127.0.0.1\n }}\n}}\n'
                )
            finally:
                if _LIBC.setns(back, CLONE_NEWNET):
                    logger.critical("a thread could not go back to the host's network namespace")
                    os._exit(70)  # nothing of the server may go on in an app's namespace
        finally:
            os.close(back)
        return index

    @staticmethod
    def _delete_link(host: Any, ns: Netns) -> None:
        found = host.link_lookup(ifname=ns.host_if)
        if found:
            host.link("del", index=found[0])

    def remove(self, ns: Netns, *, link: bool = False) -> None:
        """Unmount and unlink the namespace's file: the namespace goes with its last process,
        and the kernel deletes the veth pair with it (0.2 ms, against 15-45 ms for a netlink
        delete, which waits for RCU). ``link`` deletes the veth now (a namespace that some
        process may still hold)."""
        if link:
            with contextlib.suppress(Exception):
                self._in_host(self._delete_link, ns)
        _LIBC.umount2(bytes(ns.path), MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ns.path)

    def links(self) -> list[str]:
        """The host-side links of the suite's namespaces (for tests and clean-up checks)."""
        with contextlib.suppress(FileNotFoundError):
            return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(self.prefix))
        return []
