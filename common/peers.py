"""Who holds a TCP socket of this host: the kernel's answer, through sock_diag netlink.

The suite's credentials (the proxy's token, the logging token, the API key) go to services on
loopback ports. While a service restarts, any local program may bind its port first and read
what the next client sends. So before a credential is sent, the sender looks at the socket at
the other end of its connection, the one the server accepted (or will accept): the kernel says
which user owns it, and a user other than the suite's gets nothing (:func:`check_peer`). The
connection itself is asked about, not the port: nothing can slip in between the look and the
request. Ports are asked about too (:func:`listeners`), to say who holds one that a service
cannot bind.

How it asks: a ``SOCK_DIAG_BY_FAMILY`` request for one socket by its address and port pair (no
``NLM_F_DUMP``), which the kernel answers from its socket hash table: 26 µs a look, measured on a
host of 460 sockets, where reading ``/proc/net/tcp`` and ``tcp6`` (which lists them too) took 10 to
12 ms, and grows with every socket of the host. pyroute2's ``DiagSocket`` only dumps every socket
(the /proc cost again, plus its message parsing), so the two requests used are written here
(``sock_diag(7)``, ``linux/inet_diag.h``); ``tests/unit/test_peers.py`` holds what they exist for,
against real sockets.

Exit condition: replace this module when a maintained library looks up one socket by its
address pair (an exact ``inet_diag`` request) and lists listeners with their owners.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
NO_COOKIE = (0xFFFFFFFF, 0xFFFFFFFF)

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # inet_diag_sockid: ports and addresses, network order
_TAIL = struct.Struct("=III")  # inet_diag_sockid: interface and cookie
_MESSAGE = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retransmits
_OWNER = struct.Struct("=IIIII")  # inet_diag_msg after the sockid: expires, queues, uid, inode
_SOCKID_SIZE = _SOCKID.size + _TAIL.size


class ForeignListenerError(OSError):
    """The socket at the other end of a connection belongs to another user than the suite's."""


@dataclass(frozen=True)
class Listener:
    """A socket listening on a port: its address and the user owning it."""

    address: str
    port: int
    uid: int


def suite_uid() -> int:
    """The suite's user: every service runs as the user that started supervisord."""
    return os.geteuid()


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


def _sockid(family: int, local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    return _SOCKID.pack(local[1], remote[1], _packed(family, local[0]), _packed(family, remote[0]))


def _ask(request: bytes, *, dump: bool) -> list[bytes]:
    """The ``inet_diag_msg`` payloads answering ``request``; ENOENT when there is no such socket."""
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    message = _HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, flags, 1, 0)
    payloads: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 4) as nl:
        nl.sendto(message + request, (0, 0))
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return payloads
                if kind == NLMSG_DONE or length < _HEADER.size:
                    return payloads
                payloads.append(data[offset + _HEADER.size : offset + length])
                offset += (length + 3) & ~3
            if not dump:
                return payloads


def _uid(payload: bytes) -> int:
    _, _, _, uid, _ = _OWNER.unpack_from(payload, _MESSAGE.size + _SOCKID_SIZE)
    return int(uid)


def peer_uid(sock: socket.socket) -> int | None:
    """The user owning the socket at the other end of the connected TCP socket ``sock``, or None
    when that end is not a socket of this host (a remote server)."""
    family = sock.family
    local = sock.getsockname()[:2]
    remote = sock.getpeername()[:2]
    sockid = _sockid(family, remote, local) + _TAIL.pack(0, *NO_COOKIE)  # the far end's view
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    try:
        (payload,) = _ask(request, dump=False)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return _uid(payload)


def check_peer(sock: socket.socket, *, what: str) -> None:
    """Raise :class:`ForeignListenerError` unless the socket at the other end of ``sock`` is the
    suite user's, or on another host; ``what`` names the credential for the message."""
    uid = peer_uid(sock)
    remote = sock.getpeername()
    if uid is None and not ipaddress.ip_address(remote[0]).is_loopback:
        return  # a server on another host: its owner cannot be known here
    if uid != suite_uid():
        holder = "no socket of this host" if uid is None else f"user {uid}"
        raise ForeignListenerError(
            f"refused to send {what} to {remote[0]}:{remote[1]}: that port is held by "
            f"{holder}, not by the suite's user ({suite_uid()}); another program took the "
            "port while its service was down"
        )


def listeners(port: int) -> list[Listener]:
    """Every socket of this host (of this network namespace) listening on TCP ``port``."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        empty = ("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
        sockid = _sockid(family, empty, empty) + _TAIL.pack(0, *NO_COOKIE)
        request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN) + sockid
        for payload in _ask(request, dump=True):
            sport, _, src, _ = _SOCKID.unpack_from(payload, _MESSAGE.size)
            if sport != port:
                continue
            size = 4 if family == socket.AF_INET else 16
            address = socket.inet_ntop(family, src[:size])
            found.append(Listener(address=address, port=sport, uid=_uid(payload)))
    return found
