"""The raw netlink reads and writes (nfnl.py, nfnl_elements.py) against libnftables and the nft CLI, on the real kernel."""

import subprocess

import pytest

from egressd.kernel.backend import ApplyError
from egressd.kernel.dnssock import open_proxy_sockets
from egressd.kernel.monitor_socket import FD_BASE, raise_fd_limit
from egressd.kernel.netns import NetnsError
from egressd.kernel.nfnl import read_chain_comments
from egressd.kernel.nfnl_elements import ElementSocket
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config
from egressd.model.sandbox import DENY_ALL, parse_sandbox
from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.exprs import TABLE
from egressd.ruleset.render import FINGERPRINT_CHAIN, render
from egressd.ruleset.transactions import fingerprint_of

pytestmark = pytest.mark.root


def nft(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", *args], check=True, capture_output=True, timeout=10)


def libnft_fingerprint(backend: LibnftBackend, path: str) -> str | None:
    chain = {"chain": {"family": "inet", "table": TABLE, "name": FINGERPRINT_CHAIN}}
    listing = backend._list(path, chain)
    return None if listing is None else fingerprint_of(listing)


def test_raw_read_agrees_with_libnftables_in_every_state(netns_name):
    path = f"/run/netns/{netns_name}"
    b = LibnftBackend()
    try:
        assert read_chain_comments(path, TABLE, FINGERPRINT_CHAIN) == []  # no table at all
        assert b.fingerprint(path) is None is libnft_fingerprint(b, path)

        rs = render(
            parse_sandbox({"id": "a", "network_policy": {"allow_out": ["192.0.2.1"]}}).policy, Config()
        )
        b.apply(path, rs)
        assert b.fingerprint(path) == rs.fingerprint == libnft_fingerprint(b, path)

        b.apply(path, render(DENY_ALL, Config()))  # stage and switch: the comment moves to a new rule
        assert b.fingerprint(path) == render(DENY_ALL, Config()).fingerprint == libnft_fingerprint(b, path)

        # A tenant's own rules: one with no comment first, then one with another comment; the first comment
        # is the fingerprint, as fingerprint_of reads it from a listing.
        nft(netns_name, "flush", "chain", "inet", TABLE, FINGERPRINT_CHAIN)
        nft(netns_name, "add", "rule", "inet", TABLE, FINGERPRINT_CHAIN, "return")
        assert b.fingerprint(path) is None is libnft_fingerprint(b, path)
        nft(netns_name, "add", "rule", "inet", TABLE, FINGERPRINT_CHAIN, "return", "comment", '"egressd/x y"')
        assert read_chain_comments(path, TABLE, FINGERPRINT_CHAIN) == [None, "egressd/x y"]
        assert b.fingerprint(path) == "egressd/x y" == libnft_fingerprint(b, path)

        nft(netns_name, "delete", "table", "inet", TABLE)
        nft(netns_name, "add", "table", "ip", TABLE)  # same name, another family: not ours
        nft(netns_name, "add", "chain", "ip", TABLE, FINGERPRINT_CHAIN)
        nft(netns_name, "add", "rule", "ip", TABLE, FINGERPRINT_CHAIN, "return", "comment", '"egressd/1 x"')
        assert b.fingerprint(path) is None is libnft_fingerprint(b, path)
    finally:
        b.close()


def test_raw_read_of_a_path_that_is_no_namespace_says_so(tmp_path):
    with pytest.raises(NetnsError) as e:
        read_chain_comments(str(tmp_path / "missing"), TABLE, FINGERPRINT_CHAIN)
    assert e.value.gone
    with pytest.raises(NetnsError, match="agent's own"):
        read_chain_comments("/proc/self/ns/net", TABLE, FINGERPRINT_CHAIN)


def test_learned_addresses_written_over_raw_netlink_are_what_libnftables_lists(netns_name):
    path = f"/run/netns/{netns_name}"
    b = LibnftBackend()
    elements = ElementSocket.open(path)
    try:
        with pytest.raises(ApplyError, match="No such file or directory"):  # no table yet: refused, said so
            elements.learn("inet", TABLE, LEARNED_SETS, {"192.0.2.7": 30})
        assert elements.read("inet", TABLE, LEARNED_SETS) == {}  # and nothing to read
        b.apply(path, render(DENY_ALL, Config()))
        assert b.read_learned(path) == {}
        elements.learn("inet", TABLE, LEARNED_SETS, {"192.0.2.7": 30, "2001:db8::7": 300, "198.51.100.1": 5})
        left = b.read_learned(path)
        assert left.keys() == {"192.0.2.7", "2001:db8::7", "198.51.100.1"}
        raw = elements.read("inet", TABLE, LEARNED_SETS)  # the restart's read, over the same socket
        assert raw.keys() == left.keys() and all(abs(raw[a] - left[a]) <= 1 for a in raw)
        assert (
            28 <= left["192.0.2.7"] <= 30 and 298 <= left["2001:db8::7"] <= 300 and left["198.51.100.1"] <= 5
        )
        # An address already there gets the new time (add, delete, add), and one bad set spoils the batch.
        elements.learn("inet", TABLE, LEARNED_SETS, {"192.0.2.7": 600})
        assert 598 <= b.read_learned(path)["192.0.2.7"] <= 600
        with pytest.raises(ApplyError, match="No such file or directory"):
            elements.learn("inet", TABLE, ("learned4", "nosuch6"), {"192.0.2.8": 30, "2001:db8::8": 30})
        assert "192.0.2.8" not in b.read_learned(path)
        # The host side's family: a netdev table of the same shape.
        nft(netns_name, "add", "table", "netdev", "hs")
        nft(netns_name, "add", "set", "netdev", "hs", "learned4", "{ type ipv4_addr; flags timeout; }")
        nft(netns_name, "add", "set", "netdev", "hs", "learned6", "{ type ipv6_addr; flags timeout; }")
        elements.learn("netdev", "hs", LEARNED_SETS, {"203.0.113.5": 40})
        listed = subprocess.run(
            ["ip", "netns", "exec", netns_name, "nft", "list", "set", "netdev", "hs", "learned4"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        assert "203.0.113.5 timeout 40s" in listed
    finally:
        elements.close()
        b.close()


def test_the_proxys_sockets_sit_above_the_descriptors_libnftables_needs(netns_name):
    """libnftables' select() aborts the process on a descriptor of 1024 or more: every socket kept per
    intercepted sandbox lives above (at 200 sandboxes the low ones ran out and the agent died)."""
    raise_fd_limit()
    sockets = open_proxy_sockets(f"/run/netns/{netns_name}", 153)
    try:
        kept = [*sockets.udp, *sockets.tcp]
        assert len(kept) >= 2 and sockets.elements is not None
        assert all(s.fileno() >= FD_BASE for s in kept)
        assert sockets.elements.fileno() >= FD_BASE
        assert all(s.gettimeout() == 0.0 for s in kept)  # still non-blocking, for the event loop
    finally:
        sockets.close()
        sockets.elements.close()
