"""Throwaway network-namespace worlds (internet, router, sandboxes, microVMs) plus probes for tests.

Never connected to the caller's own network namespace; see README.md for topology and addresses.
"""

from netns_fixtures._nsutil import CommandError, in_netns, netns_socket, nsexec
from netns_fixtures.dns import DnsQuery, DnsServer, answer_addresses, call_in_netns, dns_query
from netns_fixtures.probe import (
    Outcome,
    ProbeError,
    Sniffer,
    TcpSession,
    classify_errno,
    open_tcp,
    ping,
    scapy_send,
    tcp_connect,
    tcp_probe,
    udp_echo,
    udp_probe,
)
from netns_fixtures.world import SandboxNS, VmNS, World, cleanup

__all__ = [
    "CommandError",
    "DnsQuery",
    "DnsServer",
    "Outcome",
    "ProbeError",
    "SandboxNS",
    "Sniffer",
    "TcpSession",
    "VmNS",
    "World",
    "answer_addresses",
    "call_in_netns",
    "classify_errno",
    "cleanup",
    "dns_query",
    "in_netns",
    "netns_socket",
    "nsexec",
    "open_tcp",
    "ping",
    "scapy_send",
    "tcp_connect",
    "tcp_probe",
    "udp_echo",
    "udp_probe",
]
