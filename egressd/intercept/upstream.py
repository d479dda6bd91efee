"""Asking the agent's own resolvers: one UDP exchange per question, TCP when the answer is truncated.

dnspython's asyncquery makes an asyncio datagram endpoint per query, about 0.2 ms of the proxy's added
latency. Here each question gets a plain non-blocking UDP socket of its own (a new random source port, as
a stub resolver uses: one long-lived port would make off-path spoofing easier), connected to the server so
the kernel drops datagrams from anyone else, and served by the loop's sock_* calls. A datagram that is not
the answer to this question (another id, not a response, another question) is ignored and the wait goes
on until the deadline. Questions and answers are bytes: the caller reads them (wire.py, messages.py). Every
socket sits at a descriptor of 1024 or more (hundreds can be in flight at once; libnftables, in this
process, aborts when its own socket gets one of those).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

from egressd.intercept.wire import HEADER, WireError, read_name
from egressd.kernel.monitor_socket import move_high

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


async def _udp(question: bytes, server: str, port: int, timeout: float) -> bytes:
    """The answer from server:port on a fresh socket; TimeoutError or OSError when there is none."""
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
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
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
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


async def ask(question: bytes, server: str, timeout: float, port: int = DNS_PORT) -> bytes | None:
    """The server's answer, over UDP then TCP if truncated; None when it does not answer in time or
    cannot be reached."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        data = await _udp(question, server, port, timeout)
        if data[2] & 0x02:  # TC
            return await _tcp(question, server, port, deadline - loop.time())
        return data
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
        return None
