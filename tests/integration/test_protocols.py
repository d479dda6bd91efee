"""Every IP protocol is judged, not only TCP and UDP: crafted packets, and a sniffer on the far side.

scapy builds the packets and they leave through a raw IP socket, so they pass the same hooks as any
program's traffic. The sniffer runs in the "internet" namespace and sees what really arrived.
"""

import json

import pytest

from netns_fixtures.probe import Sniffer, l3_proto, scapy_send

pytestmark = pytest.mark.root

ALLOWED4, DENIED4 = "198.51.100.10", "203.0.113.9"
ALLOWED6, DENIED6 = "2001:db8:1::10", "2001:db8:bad::9"

# (spec, IP protocol number as seen on the wire)
PROTOCOLS = [
    ({"proto": "tcp", "dport": 80}, 6),
    ({"proto": "udp", "dport": 7}, 17),
    ({"proto": "sctp", "dport": 9}, 132),
    ({"proto": "gre"}, 47),
    ({"proto": "esp"}, 50),
    ({"proto": "raw", "proto_num": 253}, 253),
    ({"proto": "raw", "proto_num": 4}, 4),  # IP-in-IP
]


def _specs(dst):
    return [{**spec, "dst": dst} for spec, _ in PROTOCOLS] + [{"proto": "icmp", "dst": dst}]


def _icmp_proto(dst):
    return 58 if ":" in dst else 1


def _arrived(sniffer, dst):
    """Protocol numbers that reached dst."""
    return {l3_proto(p) for p in sniffer.packets_to(dst)}


def _expected_protocols(dst):
    return {num for _, num in PROTOCOLS} | {_icmp_proto(dst)}


@pytest.mark.parametrize("source", ["sandbox", "vm"])
def test_every_protocol_follows_the_policy_in_both_families(world, enforce, source):
    sb = world.sandboxes[1]
    ns = sb.name if source == "sandbox" else sb.vm.name
    enforce(sb, allow_internet_access=False, allow_out=[ALLOWED4, ALLOWED6])
    with Sniffer(world.inet) as sniffer:
        for dst in (ALLOWED4, DENIED4, ALLOWED6, DENIED6):
            scapy_send(ns, _specs(dst))
    assert _arrived(sniffer, ALLOWED4) == _expected_protocols(ALLOWED4)
    assert _arrived(sniffer, ALLOWED6) == _expected_protocols(ALLOWED6)
    assert sniffer.packets_to(DENIED4) == []
    assert sniffer.packets_to(DENIED6) == []


def test_deny_out_covers_every_protocol_with_internet_on(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, deny_out=[DENIED4, DENIED6])
    with Sniffer(world.inet) as sniffer:
        for dst in (ALLOWED4, DENIED4, ALLOWED6, DENIED6):
            scapy_send(sb.name, _specs(dst))
    assert _arrived(sniffer, ALLOWED4) == _expected_protocols(ALLOWED4)
    assert _arrived(sniffer, ALLOWED6) == _expected_protocols(ALLOWED6)
    assert sniffer.packets_to(DENIED4) == [] and sniffer.packets_to(DENIED6) == []


def test_denied_packets_are_counted(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False)
    scapy_send(sb.name, _specs(DENIED4) + _specs(DENIED6))
    out = world.exec(sb.name, ["nft", "-j", "list", "counter", "inet", "egressd", "denied"]).stdout
    counters = [item["counter"] for item in json.loads(out)["nftables"] if "counter" in item]
    assert counters[0]["packets"] == len(_specs(DENIED4)) * 2
