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
- ``icmp_type``/``icmp_code`` (icmp: any ICMP or ICMPv6 type instead of an echo request)
- ``ext`` (IPv6: extension headers in order, among ``hbh``, ``dst``, ``rh``)
- ``fragment`` - fragment size in bytes: the packet leaves as fragments (IPv6: with a fragment header)
- ``via`` - ``"packet"`` sends it the way scapy does by default, through an AF_PACKET socket (routed and
  resolved by scapy, framed for ``eth0``): below IP, so no inet hook of this namespace sees it. That is the
  raw-socket bypass the host-side table exists for.
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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if family == socket.AF_INET6 and dst.lower().startswith(("fe80:", "ff02:", "ff01:")):
            sock.connect((dst, 9, 0, socket.if_nametoindex("eth0")))
        else:
            sock.connect((dst, 9))
        return str(sock.getsockname()[0]).split("%")[0]


def build(spec: dict[str, Any]) -> tuple[int, str, list[bytes]]:
    """Turn one spec into (family, dst, wire packets): several when it asks for fragments."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
    from scapy.layers.inet6 import (
        ICMPv6EchoRequest,
        ICMPv6Unknown,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        fragment6,
    )
    from scapy.layers.l2 import GRE
    from scapy.layers.sctp import SCTP, SCTPChunkInit
    from scapy.packet import Packet, Raw

    unknown = set(spec) - {
        "dst", "family", "proto", "proto_num", "src", "sport", "dport", "flags", "payload", "ttl",
        "count", "spi", "icmp_type", "icmp_code", "ext", "fragment", "via",
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
    elif proto == "icmp" and "icmp_type" in spec:
        kind, code = int(spec["icmp_type"]), int(spec.get("icmp_code", 0))
        upper = (ICMPv6Unknown(type=kind, code=code) if v6 else ICMP(type=kind, code=code)) / Raw(payload)
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
    frag = int(spec.get("fragment", 0))
    if v6:
        l3: Packet = IPv6(src=src, dst=dst, hlim=ttl)
        last = l3
        exts = {"hbh": IPv6ExtHdrHopByHop, "dst": IPv6ExtHdrDestOpt, "rh": IPv6ExtHdrRouting}
        for name in spec.get("ext", ()):
            if name not in exts:
                raise ValueError(f"ext must be among {sorted(exts)}")
            hdr = exts[name](addresses=[dst]) if name == "rh" else exts[name]()
            l3 = l3 / hdr
            last = hdr
        if frag:
            l3 = l3 / IPv6ExtHdrFragment()
            last = l3.lastlayer()
        if proto_num is not None:
            last.nh = proto_num
        pkt = l3 / upper
        wires = [bytes(p) for p in fragment6(pkt, frag)] if frag else [bytes(pkt)]
    else:
        if spec.get("ext"):
            raise ValueError("ext is for IPv6 only")
        l3 = IP(src=src, dst=dst, ttl=ttl)
        if proto_num is not None:
            l3.proto = proto_num
        pkt = l3 / upper
        wires = [bytes(p) for p in fragment(pkt, fragsize=frag)] if frag else [bytes(pkt)]
    return family, dst, wires


def send_specs(specs: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Build and send every spec from the *current* network namespace; returns (sent, refused).

    A packet that netfilter refuses at the output hook fails sendto() with EPERM: that is a result the
    tests look for, not an error, so it is counted and sending goes on.
    """
    built = []
    below_ip = []
    for spec in specs:
        family, dst, wires = build(spec)
        copies = [(family, dst, wire) for wire in wires] * int(spec.get("count", 1))
        (below_ip if spec.get("via") == "packet" else built).extend(copies)
    if below_ip:
        _send_packet_socket(below_ip)
    socks: dict[tuple[int, bool], socket.socket] = {}
    refused = 0
    try:
        for family, dst, wire in built:
            # Link-scope IPv6 destinations need an interface: a socket bound to the sandbox's eth0.
            link_scope = family == socket.AF_INET6 and dst.lower().startswith(("fe80:", "ff02:", "ff01:"))
            key = (family, link_scope)
            sock = socks.get(key)
            if sock is None:
                # IPPROTO_RAW implies "header included" for both families on Linux.
                sock = socks[key] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
                if family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                if link_scope:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
            try:
                sock.sendto(wire, (dst, 0))
            except PermissionError:
                refused += 1
    finally:
        for sock in socks.values():
            sock.close()
    return len(built) + len(below_ip) - refused, refused


def _send_packet_socket(packets: list[tuple[int, str, bytes]]) -> None:
    """Through scapy's default layer-3 sender on Linux, which frames the packet itself and writes it to
    an AF_PACKET socket on the route's interface."""
    from scapy.config import conf
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.sendrecv import send

    conf.verb = 0
    for family, _, wire in packets:
        send(IP(wire) if family == socket.AF_INET else IPv6(wire), verbose=False)


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
