"""Echo server run inside a namespace: TCP line echo and UDP datagram echo on IPv4 and IPv6.

Started by World as ``ip netns exec NS python -m netns_fixtures.server --tcp 80,443 --udp 7``.
It prints ``READY`` once every listener is bound, and exits on SIGTERM/SIGINT or when its stdin
reaches EOF (the parent holds the write end, so the server dies with the parent, even on SIGKILL).

Separate v4 and v6 sockets are used so UDP replies can be sent *from the address the request was
sent to* (IP_PKTINFO / IPV6_PKTINFO): with AnyIP routes (``local 198.51.100.0/24 dev lo``) a
wildcard UDP socket would otherwise answer from the interface address and connected clients would
ignore the reply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys

IP_PKTINFO = 8  # linux/in.h; socket.IP_PKTINFO is missing from Python 3.11
IPV6_FREEBIND = 78  # linux/in6.h
MAX_LINE = 65536


def _ports(text: str) -> list[int]:
    """Parse "80,443" into [80, 443]; empty string means no ports."""
    return [int(p) for p in text.split(",") if p.strip()]


async def _echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every line back and keep the connection open until the client closes it."""
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, OSError):
        pass  # client went away or sent an over-long line: just close
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _tcp_socket(family: int, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _udp_socket(family: int, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        # IPv6 only accepts an IPV6_PKTINFO source that is an assigned address (ipv6_chk_addr), and
        # AnyIP addresses are not; freebind lifts that check. IPv4 accepts any local-route address.
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.bind(("::", port))
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


def _udp_echo_once(sock: socket.socket) -> None:
    """Answer one datagram from the destination address it was sent to."""
    try:
        data, ancdata, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(64))
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        return  # e.g. ECONNREFUSED queued from an earlier reply's ICMP error
    cmsgs = []
    for level, ctype, cdata in ancdata:
        if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and len(cdata) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }: reply from addr.
            cmsgs.append((socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, cdata[8:12], b"\0" * 4)))
        elif level == socket.IPPROTO_IPV6 and ctype == socket.IPV6_PKTINFO and len(cdata) >= 20:
            # struct in6_pktinfo { in6_addr addr; int ifindex; }: same address, any interface.
            cmsgs.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, cdata[:16] + struct.pack("=i", 0)))
    with contextlib.suppress(OSError):
        sock.sendmsg([data], cmsgs, 0, peer)


async def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    """Bind everything, print READY, then run until told to stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    servers = []
    udp_socks: list[socket.socket] = []
    for port in tcp_ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            servers.append(await asyncio.start_server(_echo_lines, sock=_tcp_socket(family, port)))
    for port in udp_ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            sock = _udp_socket(family, port)
            loop.add_reader(sock.fileno(), _udp_echo_once, sock)
            udp_socks.append(sock)

    stdin_fd = sys.stdin.fileno()
    os.set_blocking(stdin_fd, False)

    def _on_stdin() -> None:
        try:
            chunk = os.read(stdin_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            stop.set()

    loop.add_reader(stdin_fd, _on_stdin)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await stop.wait()
    for server in servers:
        server.close()
    for sock in udp_socks:
        loop.remove_reader(sock.fileno())
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp", default="", help="comma separated TCP echo ports")
    parser.add_argument("--udp", default="", help="comma separated UDP echo ports")
    args = parser.parse_args(argv)
    asyncio.run(serve(_ports(args.tcp), _ports(args.udp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
