"""The raw netlink fingerprint read (nfnl.py) against libnftables and the nft CLI, on the real kernel."""

import subprocess

import pytest

from egressd.kernel.netns import NetnsError
from egressd.kernel.nfnl import read_chain_comments
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config
from egressd.model.sandbox import DENY_ALL, parse_sandbox
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
