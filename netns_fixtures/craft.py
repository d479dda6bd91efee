"""Send hand-crafted IPv4/IPv6 packets through the local IP stack, so nftables hooks see them.

Run inside a namespace as ``ip netns exec NS python -m netns_fixtures.craft`` with a JSON list of
packet specs on stdin (or as the first argument); prints ``{"sent": N}``.

Packets are built with scapy but sent through a plain ``SOCK_RAW/IPPROTO_RAW`` socket (header
included). That is deliberate: scapy's default ``send()`` on Linux uses an AF_PACKET socket
(``conf.L3socket = L3PacketSocket``), which injects below IP and bypasses the nftables output hooks.

Spec keys (one dict per packet):

- ``dst`` (required) - destination address; the family follows from it (or give ``family``: 4/6)
- ``proto`` - one of ``tcp udp icmp sctp gre esp raw`` (default ``raw``); ``icmp`` means ICMPv6
  echo for IPv6. ``raw`` needs ``proto_num`` (IP protocol / IPv6 next header, 0-255)
- ``src`` - default: the source address the kernel would pick for ``dst`` in this namespace
- ``sport``/``dport`` (tcp, udp, sctp; defaults 40000/9), ``flags`` (tcp, default ``"S"``)
- ``payload`` - hex string (default: ``"netns-fixtures"`` in ASCII), ``ttl`` (hop limit, default 64)
- ``count`` - how many copies to send (default 1), ``spi`` (esp, default 0x100)
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Sequence
from typing import Any

PROTOS = ("tcp", "udp", "icmp", "sctp", "gre", "esp", "raw")
DEFAULT_PAYLOAD = b"netns-fixtures"


def _source_for(family: int, dst: str) -> str:
    """Ask the kernel which source it would use for ``dst`` (a UDP connect sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((dst, 9))
        return str(sock.getsockname()[0])


def build(spec: dict[str, Any]) -> tuple[int, str, bytes]:
    """Turn one spec into (family, dst, wire bytes). Raises ValueError for bad specs."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import GRE
    from scapy.layers.sctp import SCTP, SCTPChunkInit
    from scapy.packet import Packet, Raw

    unknown = set(spec) - {
        "dst", "family", "proto", "proto_num", "src", "sport", "dport", "flags", "payload", "ttl",
        "count", "spi",
    }  # fmt: skip
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}")
    dst = str(spec["dst"])
    family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(int(spec.get("family", 6 if ":" in dst else 4)), -1)
    if family == -1:
        raise ValueError("family must be 4 or 6")
    proto = str(spec.get("proto", "raw"))
    if proto not in PROTOS:
        raise ValueError(f"proto must be one of {PROTOS}")
    payload = bytes.fromhex(spec["payload"]) if "payload" in spec else DEFAULT_PAYLOAD
    sport, dport = int(spec.get("sport", 40000)), int(spec.get("dport", 9))
    src = str(spec.get("src") or _source_for(family, dst))
    v6 = family == socket.AF_INET6
    ttl = int(spec.get("ttl", 64))

    upper: Packet
    if proto == "tcp":
        upper = TCP(sport=sport, dport=dport, flags=str(spec.get("flags", "S")), seq=1000) / Raw(payload)
    elif proto == "udp":
        upper = UDP(sport=sport, dport=dport) / Raw(payload)
    elif proto == "icmp":
        upper = (ICMPv6EchoRequest(id=0x4E46, seq=1) if v6 else ICMP(id=0x4E46, seq=1)) / Raw(payload)
    elif proto == "sctp":
        upper = SCTP(sport=sport, dport=dport, tag=0) / SCTPChunkInit(init_tag=0x4E4E4E4E)
    elif proto == "gre":
        upper = GRE(proto=0x0800) / Raw(payload)
    elif proto == "esp":
        spi = int(spec.get("spi", 0x100))
        upper = Raw(spi.to_bytes(4, "big") + (1).to_bytes(4, "big") + payload)
    else:
        if "proto_num" not in spec:
            raise ValueError("proto 'raw' needs proto_num")
        upper = Raw(payload)

    proto_num = {"gre": 47, "esp": 50}.get(proto)
    if proto == "raw":
        proto_num = int(spec["proto_num"])
        if not 0 <= proto_num <= 255:
            raise ValueError("proto_num must be 0..255")
    if v6:
        l3 = IPv6(src=src, dst=dst, hlim=ttl)
        if proto_num is not None:
            l3.nh = proto_num
    else:
        l3 = IP(src=src, dst=dst, ttl=ttl)
        if proto_num is not None:
            l3.proto = proto_num
    return family, dst, bytes(l3 / upper)


def send_specs(specs: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Build and send every spec from the *current* network namespace; returns (sent, refused).

    A packet that netfilter refuses at the output hook fails sendto() with EPERM: that is a result the
    tests look for, not an error, so it is counted and sending goes on.
    """
    built = []
    for spec in specs:
        family, dst, wire = build(spec)
        built += [(family, dst, wire)] * int(spec.get("count", 1))
    socks: dict[int, socket.socket] = {}
    refused = 0
    try:
        for family, dst, wire in built:
            sock = socks.get(family)
            if sock is None:
                # IPPROTO_RAW implies "header included" for both families on Linux.
                sock = socks[family] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                sock.sendto(wire, (dst, 0))
            except PermissionError:
                refused += 1
    finally:
        for sock in socks.values():
            sock.close()
    return len(built) - refused, refused


def main(argv: list[str] | None = None) -> int:
    """CLI: JSON spec list from argv[1] or stdin; prints {"sent": N, "refused": M} or {"error": ...}."""
    args = sys.argv[1:] if argv is None else argv
    text = args[0] if args else sys.stdin.read()
    try:
        specs = json.loads(text)
        sent, refused = send_specs([specs] if isinstance(specs, dict) else specs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps({"sent": sent, "refused": refused}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
