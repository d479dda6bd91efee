"""A sandbox's own table (`inet egressd`) written over raw netlink (kernel/nfnl_encode.py, nfnl_inet.py,
nfnl_sandbox.py) against libnftables, on this kernel.

Each scenario runs the same egressd commands twice, in two scratch namespaces: with `nft -j -f`
(libnftables) in one, through the raw writer's socket cache in the other. The tables must list the same
(`nft -j list table inet egressd`, handles and expiry countdowns aside), whatever the libnftables version:
the `listing` cases. The `bytes` cases also capture, under strace, the messages nft sent and compare them
with the encoder's, byte for byte but for what is the encoder's own (sequence numbers, NLM_F_ACK, set ids,
the numbering of element lists): that needs strace and libnftables 1.0.6, whose messages the encoder
reproduces, and they skip, saying so, anywhere else.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from egressd.kernel.backend import ApplyError
from egressd.kernel.netns import NetnsError
from egressd.kernel.nfnl_encode import encode_batch
from egressd.kernel.nfnl_sandbox import PLAIN_SETS, SandboxSockets
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render
from egressd.ruleset.transactions import (
    learn_commands,
    plan_apply,
    plan_elements,
    plan_replace,
    replace_table,
)
from tests.integration.test_nfnl_batch import LOG_CHAIN, VERSION, logging_commands, sh, strace_batch
from tests.integration.test_nfnl_batch import listing as batch_listing
from tests.integration.test_nfnl_batch import messages as batch_messages
from tests.unit.test_render import CASES

pytestmark = pytest.mark.root

STRACE = shutil.which("strace")


NO_BYTES = (
    f"libnftables {VERSION} here: the encoder reproduces 1.0.6's messages, so only listings are compared"
    if VERSION != "1.0.6"
    else "strace is not installed: only listings are compared"
    if not STRACE
    else None
)


def policy(**network_policy):
    return parse_sandbox({"id": "sb", "network_policy": network_policy}).policy


NAMES = policy(
    allow_internet_access=False,
    allow_out=["a.example.com", "*.b.example.org", "198.51.100.10", "2001:db8:1::/48"],
    deny_out=["c.example.net", "203.0.113.0/24"],
)
OPEN_NAMES = policy(allow_out=["a.example.com"], deny_out=["c.example.net", "2001:db8:bad::/48"])
CLOSED = policy(allow_internet_access=False, allow_out=["198.51.100.64/26", "2001:db8:2::7"])
NO_INTERCEPT = config_from_dict({"dns": {"intercept": False}})
RESOLVERS = config_from_dict(
    {"dns": {"intercept": False, "sandbox_resolvers": ["192.0.2.53", "2001:db8:53::53"]}}
)
DROP = config_from_dict({"enforce": {"deny_action": "drop", "uplink": "veth9"}})


def listing(ns: str) -> list[dict] | None:
    return batch_listing(ns, "egressd", "inet")


def messages(batch: bytes) -> list:
    """test_nfnl_batch.messages, and element lists numbered alike in deletions too (DELSETELEM)."""
    out = batch_messages(batch)
    for message in out:
        if message[0] & 0xFF == 14:
            message[3] = [[t, [[1, e[1]] for e in v] if t == 3 else v] for t, v in message[3]]
    return out


class Writers:
    """The same commands both ways: nft -j -f in the first namespace (under strace when `compare`), the raw
    writer's kept socket in the second."""

    def __init__(self, names: list[str], tmp: Path, compare: bool) -> None:
        self.lib, self.raw = names
        self.tmp = tmp
        self.compare = compare
        self.sockets = SandboxSockets()
        self.compared = 0

    def run(self, commands: list[dict]) -> None:
        path, trace = self.tmp / "cmds.json", self.tmp / "strace.txt"
        path.write_text(json.dumps({"nftables": commands}))
        wrap = (
            [STRACE, "-f", "-e", "trace=sendmsg", "-e", "write=all", "-o", str(trace)] if self.compare else []
        )
        out = sh("ip", "netns", "exec", self.lib, *wrap, "nft", "-j", "-f", str(path), check=False)
        assert out.returncode == 0, out.stderr
        self.sockets.run(f"/run/netns/{self.raw}", commands, "test")
        if self.compare:
            assert messages(strace_batch(trace)) == messages(encode_batch(commands, 0, PLAIN_SETS).data)
            self.compared += 1
        assert listing(self.lib) == listing(self.raw)

    def close(self) -> None:
        self.sockets.close()


@pytest.fixture
def namespaces():
    names = [f"egns{os.getpid() % 100000}{side}" for side in "lr"]
    try:
        for ns in names:
            sh("ip", "netns", "delete", ns, check=False)
            sh("ip", "netns", "add", ns)
        yield names
    finally:
        for ns in names:
            sh("ip", "netns", "delete", ns, check=False)


@pytest.fixture(params=["listing", "bytes"])
def writers(request, namespaces, tmp_path):
    if request.param == "bytes" and NO_BYTES:
        pytest.skip(NO_BYTES)
    w = Writers(namespaces, tmp_path, request.param == "bytes")
    yield w
    w.close()


def dns_elements(ruleset) -> dict[str, list[str]]:
    return {n: ["192.0.2.1", "192.0.2.2"] if n.endswith("4") else ["2001:db8::1"] for n in ruleset.dns_sets}


def _golden(name: str) -> Callable[[Writers], None]:
    pol, cfg = CASES[name]

    def scenario(w: Writers) -> None:
        ruleset = render(parse_sandbox({"id": name, "network_policy": pol}).policy, config_from_dict(cfg))
        w.run(replace_table(ruleset, dns_elements(ruleset))["nftables"])

    return scenario


def _first_write(pol, config: Config) -> Callable[[Writers], None]:
    def scenario(w: Writers) -> None:
        ruleset = render(pol, config)
        w.run(replace_table(ruleset, dns_elements(ruleset))["nftables"])
        assert listing(w.raw) is not None

    return scenario


def _update(w: Writers) -> None:
    """Replace, a stage left over, stage (clearing it) and switch (retiring), back, and a replace of a
    table that is there."""
    first, second = render(NAMES, Config()), render(CLOSED, DROP)
    w.run(plan_replace(first, {"allow_dns4": ["192.0.2.1"]}).steps[0].commands)
    w.run(plan_apply(second, None, listing(w.lib)).steps[0].commands)  # staged, never switched to
    for ruleset, elements in (
        (second, None),
        (first, {"allow_dns4": ["192.0.2.9"], "deny_dns6": ["2001:db8::9"]}),
    ):
        for step in plan_apply(ruleset, elements, listing(w.lib)).steps:
            w.run(step.commands)
    w.run(plan_replace(render(OPEN_NAMES, Config()), None).steps[0].commands)


def _elements_and_learned(w: Writers) -> None:
    ruleset = render(NAMES, Config())
    plan = plan_replace(ruleset, {"allow_dns4": ["192.0.2.9"], "deny_dns6": ["2001:db8::9"]})
    w.run(plan.steps[0].commands)
    add = {"allow_dns4": ["192.0.2.10"], "allow_dns6": ["2001:db8::10"], "deny_dns4": ["192.0.2.66"]}
    step = plan_elements(
        add, {"allow_dns4": ["192.0.2.9"], "deny_dns6": ["2001:db8::9"]}, plan.written.variant
    )
    assert step is not None
    w.run(step.commands)
    w.run(learn_commands({"198.51.100.1": 30, "2001:db8:5::1": 60, "198.51.100.3": 3600}))
    w.run(learn_commands({"198.51.100.1": 90}))  # there already: its timeout is set again
    w.run(learn_commands({"198.51.100.2": 30}, replace=True))
    learned = next(i["set"] for i in listing(w.raw) if i.get("set", {}).get("name") == "learned4")
    assert [e["elem"]["val"] for e in learned["elem"]] == ["198.51.100.2"]


def _large(w: Writers) -> None:
    """Sets too large for one message (an attribute's length is 16 bits): libnftables splits them."""
    v4 = [f"198.18.{i // 128}.{2 * (i % 128)}" for i in range(2000)]
    v6 = [f"2001:db8:{i:x}::/64" for i in range(0, 4000, 2)]
    ruleset = render(policy(allow_internet_access=False, allow_out=[*v4, *v6, "a.example.com"]), NO_INTERCEPT)
    plan = plan_replace(ruleset, None)
    w.run(plan.steps[0].commands)
    names = [f"198.19.{i // 200}.{i % 200}" for i in range(3000)]
    w.run(plan_elements({"allow_dns4": names}, {}, plan.written.variant).commands)
    w.run(plan_elements({}, {"allow_dns4": names[:2900]}, plan.written.variant).commands)


def _logging(w: Writers) -> None:
    """A step's logging chain (limit, log, goto deny) and the other forms of limit and log, in inet."""
    commands = plan_replace(render(CLOSED, Config()), None).steps[0].commands
    w.run(commands + logging_commands({"family": "inet", "table": "egressd"}, "deny_a"))
    rules = [i["rule"]["expr"] for i in listing(w.raw) if i.get("rule", {}).get("chain") == LOG_CHAIN]
    assert rules[0][:2] == [
        {"limit": {"rate": 50, "burst": 100, "per": "second"}},
        {"log": {"prefix": "deny_out", "group": 2}},
    ]


def _delete(w: Writers) -> None:
    w.run(plan_replace(render(CLOSED, Config()), None).steps[0].commands)
    w.run([{"delete": {"table": {"family": "inet", "name": "egressd"}}}])
    assert listing(w.lib) is None and listing(w.raw) is None


SCENARIOS = {
    **{f"golden-{name}": _golden(name) for name in sorted(CASES)},
    "deny-drop": _first_write(CLOSED, DROP),
    "names-intercepted-closed": _first_write(NAMES, Config()),
    "names-intercepted-open": _first_write(OPEN_NAMES, Config()),
    "names-not-intercepted": _first_write(NAMES, NO_INTERCEPT),
    "names-sandbox-resolvers": _first_write(NAMES, RESOLVERS),
    "update-stage-switch-retire": _update,
    "element-updates-and-learned-addresses": _elements_and_learned,
    "delete-table": _delete,
    "limit-log-goto": _logging,
    "large-sets": _large,
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_raw_writes_list_as_libnftables_writes(writers, scenario):
    SCENARIOS[scenario](writers)
    assert writers.compared > 0 or not writers.compare


def test_a_refused_batch_names_the_command_and_changes_nothing(namespaces):
    path = f"/run/netns/{namespaces[1]}"
    sockets = SandboxSockets()
    try:
        sockets.run(path, plan_replace(render(CLOSED, Config()), None).steps[0].commands, "table")
        before = listing(namespaces[1])
        bad = [
            {"flush": {"chain": {"family": "inet", "table": "egressd", "name": "output"}}},
            {"add": {"rule": {"family": "inet", "table": "egressd", "chain": "output",
                              "expr": [{"jump": {"target": "decide_b"}}]}}},
        ]  # fmt: skip
        with pytest.raises(ApplyError, match=r"No such file or directory \(command 1: add rule inet egressd"):
            sockets.run(path, bad, "switch")
        assert listing(namespaces[1]) == before
    finally:
        sockets.close()


def test_the_backend_writes_raw_and_falls_back_to_libnftables_for_what_it_cannot_encode(namespaces):
    """LibnftBackend(raw=True) writes over its kept socket, no libnftables context made for it; a command
    the encoder does not know goes through libnftables, logged once."""
    path = f"/run/netns/{namespaces[0]}"
    backend = LibnftBackend(raw=True)
    try:
        ruleset = render(NAMES, Config())
        backend.apply(path, ruleset, dns_elements(ruleset), [])
        assert len(backend._sockets) == 1 and len(backend._cache) == 0
        assert backend.fingerprint(path) == ruleset.fingerprint
        odd = [{"add": {"rule": {"family": "inet", "table": "egressd", "chain": "input",
                                 "expr": [{"log": {"prefix": "x", "level": "info"}}]}}}]  # fmt: skip
        for _ in range(2):
            backend.run(path, odd, "odd rule")
        assert len(backend._cache) == 1  # libnftables wrote it
        rules = [i["rule"] for i in listing(namespaces[0]) if i.get("rule", {}).get("chain") == "input"]
        assert sum(any("log" in e for e in r["expr"]) for r in rules) == 2
        assert len(backend._fallbacks) == 1
        assert backend.remove(path) is True and backend.remove(path) is False
    finally:
        backend.close()


def test_a_namespace_made_again_at_the_same_path_gets_a_socket_of_its_own(namespaces):
    """The kept socket belongs to the namespace it was made in: a new namespace at the path is written
    through a new one, never the old one (which would write into the namespace that is gone, or keep it)."""
    name = namespaces[1]
    path = f"/run/netns/{name}"
    sockets = SandboxSockets()
    try:
        commands = plan_replace(render(CLOSED, Config()), None).steps[0].commands
        sockets.run(path, commands, "table")
        first = sockets.ident(path)
        sh("ip", "netns", "delete", name)
        sh("ip", "netns", "add", name)
        assert listing(name) is None
        sockets.run(path, commands, "table")
        assert sockets.ident(path) != first and listing(name) is not None
        sh("ip", "netns", "delete", name)
        with pytest.raises(NetnsError):
            sockets.run(path, commands, "table")
        assert sockets.ident(path) is None and len(sockets) == 0  # let go of at once
    finally:
        sockets.close()
