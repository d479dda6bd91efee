"""Asking the agent's own resolvers: one UDP exchange per question, TCP when the answer is truncated.

dnspython's asyncquery makes an asyncio datagram endpoint per query, about 0.2 ms of the proxy's added
latency. Here each question gets a plain non-blocking UDP socket of its own (a new random source port, as
a stub resolver uses: one long-lived port would make off-path spoofing easier), connected to the server so
the kernel drops datagrams from anyone else, and served by the loop's sock_* calls. A datagram that is not
the answer to this question (another id, not a response, another question) is ignored and the wait goes
on until the deadline. Truncated answers go to dnspython's TCP exchange.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message

DNS_PORT = 53
MAX_UDP = 65535


def _answer_to(query: dns.message.Message, wire: bytes, data: bytes) -> dns.message.Message | None:
    """data read as the answer to query, or None: another id, not DNS, or not a response to it."""
    if data[:2] != wire[:2]:
        return None
    try:
        answer = dns.message.from_wire(data)
    except dns.exception.DNSException:
        return None
    return answer if query.is_response(answer) else None


async def _udp(query: dns.message.Message, server: str, port: int, timeout: float) -> dns.message.Message:
    """The answer from server:port on a fresh socket; TimeoutError or OSError when there is none."""
    wire = query.to_wire()
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as sock:
        sock.connect((server, port))  # UDP: no packet; only this server's datagrams reach the socket
        await loop.sock_sendall(sock, wire)
        async with asyncio.timeout(timeout):
            while True:
                answer = _answer_to(query, wire, await loop.sock_recv(sock, MAX_UDP))
                if answer is not None:
                    return answer


async def ask(
    query: dns.message.Message, server: str, timeout: float, port: int = DNS_PORT
) -> dns.message.Message | None:
    """The server's answer to query, over UDP then TCP if truncated; None when it does not answer in time
    or cannot be reached."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        answer = await _udp(query, server, port, timeout)
        if answer.flags & dns.flags.TC:
            return await dns.asyncquery.tcp(query, server, timeout=deadline - loop.time(), port=port)
        return answer
    except (TimeoutError, OSError, dns.exception.DNSException, ValueError):
        return None
