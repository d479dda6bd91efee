"""Asking a nameserver: one UDP exchange per question, TCP when the answer is truncated; and asking the
configured nameservers in turn. Shared by the DNS proxy (intercept/service.py) and the agent's own resolver
(desired/query.py).

dnspython's asyncquery makes an asyncio datagram endpoint per query, about 0.2 ms of the proxy's added
latency and much of what the agent's resolver spent per query. Here each question gets a plain
non-blocking UDP socket of its own (a new random source port, as a stub resolver uses: one long-lived port
would make off-path spoofing easier), connected to the server so the kernel drops datagrams from anyone
else, and served by the loop's sock_* calls. A datagram that is not
the answer to this question (another id, not a response, another question) is ignored and the wait goes
on until the deadline. Questions and answers are bytes: the caller reads them (dnswire.py, or dnspython).
Every socket sits at a descriptor of 1024 or more (hundreds can be in flight at once; libnftables, in this
process, aborts when its own socket gets one of those: fds.py).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import dns.resolver

from egressd.common.dnswire import HEADER, WireError, read_name
from egressd.common.fds import move_high

DNS_PORT = 53
MAX_UDP = 65535


def matches(question: bytes, data: bytes) -> bool:
    """Whether data answers the question (a query of ours: one question): the same id, a response to a
    standard query, the same question (the name in any case)."""
    try:
        end = read_name(question, HEADER.size)[1] + 4
    except WireError:
        return False
    return (
        len(data) >= end
        and data[:2] == question[:2]
        and data[2] & 0xF8 == 0x80  # QR set, opcode QUERY
        and data[4:6] == b"\0\1"
        and data[HEADER.size : end - 4].lower() == question[HEADER.size : end - 4].lower()
        and data[end - 4 : end] == question[end - 4 : end]
    )


@functools.lru_cache(maxsize=64)
def _family(server: str) -> int:
    """AF_INET or AF_INET6 for a nameserver's address; ValueError when it is not one."""
    return socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET


async def _udp(question: bytes, server: str, port: int, timeout: float) -> bytes:
    """The answer from server:port on a fresh socket; TimeoutError or OSError when there is none."""
    family = _family(server)
    loop = asyncio.get_running_loop()
    low = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    with move_high(low) as sock:
        sock.connect((server, port))  # UDP: no packet; only this server's datagrams reach the socket
        await loop.sock_sendall(sock, question)
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(sock, MAX_UDP)
                if matches(question, data):
                    return data


async def _tcp(question: bytes, server: str, port: int, timeout: float) -> bytes:
    """The answer over TCP (length-prefixed); TimeoutError, OSError or IncompleteReadError otherwise."""
    family = _family(server)
    sock = move_high(socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))
    sock.setblocking(False)
    async with asyncio.timeout(timeout):
        try:
            await asyncio.get_running_loop().sock_connect(sock, (server, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(struct.pack("!H", len(question)) + question)
            await writer.drain()
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(size)
                if matches(question, data):
                    return data
        finally:
            writer.close()


async def exchange(question: bytes, server: str, timeout: float, port: int = DNS_PORT) -> bytes:
    """The server's answer, over UDP then TCP if truncated. Raises TimeoutError when none comes in time,
    OSError (the server or its network unreachable, no descriptor free), EOFError (the TCP connection
    closed early), ValueError (not an address)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = await _udp(question, server, port, timeout)
    if data[2] & 0x02:  # TC
        return await _tcp(question, server, port, deadline - loop.time())
    return data


async def ask(question: bytes, server: str, timeout: float, port: int = DNS_PORT) -> bytes | None:
    """The server's answer, over UDP then TCP if truncated; None when it does not answer in time or
    cannot be reached."""
    try:
        return await exchange(question, server, timeout, port)
    except (TimeoutError, OSError, EOFError, ValueError):
        return None


class Unusable(Exception):
    """An answer not to be taken from this nameserver (REFUSED, SERVFAIL, unreadable): the next one is
    asked. The message says what it said (`REFUSED`)."""


@dataclass(frozen=True)
class NoAnswer:
    """No nameserver gave a usable answer: what each said, and whether any stayed silent."""

    said: tuple[str, ...]  # "REFUSED from 192.0.2.53"
    timed_out: bool

    def __str__(self) -> str:
        if self.timed_out:
            return "timeout: no answer from the nameservers"
        return "no nameserver answered: " + (", ".join(self.said) or "none configured")


T = TypeVar("T")


async def ask_each(
    question: bytes,
    servers: Sequence[str],
    timeout: float,
    read: Callable[[bytes], T],
    port: int = DNS_PORT,
) -> T | NoAnswer:
    """The question to each nameserver in turn until one gives an answer that read takes (read raises
    Unusable to pass one over). Each gets its share of the time left (a silent one leaves the rest to the
    next; one that refuses at once leaves its share to those after it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    said: list[str] = []
    timed_out = False
    for i, server in enumerate(servers):
        share = max(0.0, deadline - loop.time()) / (len(servers) - i)
        try:
            data = await exchange(question, server, share, port)
        except TimeoutError:
            timed_out = True
            continue
        except (OSError, EOFError, ValueError) as e:
            said.append(f"{e} from {server}")
            continue
        try:
            return read(data)
        except Unusable as e:
            said.append(f"{e} from {server}")
    return NoAnswer(tuple(said), timed_out)


def system_nameservers() -> list[str]:
    """The host's resolv.conf nameservers. Raises dns.resolver.NoResolverConfiguration when it has none."""
    return list(dns.resolver.Resolver(configure=True).nameservers)
