"""Throwaway network-namespace worlds (internet, router, sandboxes, microVMs) plus probes for tests.

Never connected to the caller's own network namespace; see README.md for topology and addresses.
"""

from netns_fixtures._nsutil import CommandError, in_netns, netns_socket, nsexec
from netns_fixtures.probe import (
    ProbeError,
    Sniffer,
    TcpSession,
    open_tcp,
    ping,
    scapy_send,
    tcp_connect,
    udp_echo,
)
from netns_fixtures.world import SandboxNS, VmNS, World, cleanup

__all__ = [
    "CommandError",
    "ProbeError",
    "SandboxNS",
    "Sniffer",
    "TcpSession",
    "VmNS",
    "World",
    "cleanup",
    "in_netns",
    "netns_socket",
    "nsexec",
    "open_tcp",
    "ping",
    "scapy_send",
    "tcp_connect",
    "udp_echo",
]
