"""The host-side tables written over raw netlink (kernel/nfnl_batch.py) against libnftables, on this kernel.

Each scenario runs the same egressd commands twice, in two scratch namespaces that each hold a veth end
of the same name for the ingress hook: with `nft -j -f` (libnftables) in one, with one BatchSocket batch in
the other. The tables must list the same (`nft -j list table`, handles and expiry countdowns aside). When
strace is there, the messages libnftables sent are captured too and must be the encoder's, byte for byte,
but for what is the encoder's own: sequence numbers, NLM_F_ACK, set ids, the numbering of element lists.
"""

import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import time
from pathlib import Path

import pytest

from egressd.kernel.backend import ApplyError
from egressd.kernel.hostside import target_for
from egressd.kernel.nfnl_batch import BatchSocket, encode_batch
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.render import render
from egressd.ruleset.transactions import learn_commands, plan_after, plan_apply, plan_elements, plan_replace

pytestmark = pytest.mark.root

IFACE = "egb-veth0"
TARGET = target_for(IFACE)
STRACE = shutil.which("strace")
RESOLVERS = config_from_dict(
    {"dns": {"intercept": False, "sandbox_resolvers": ["192.0.2.53", "2001:db8:53::53"]}}
)
GUARDED = config_from_dict(
    {"guard": {"allow": ["192.0.2.53/32"], "deny": ["169.254.0.0/16", "fd00:ec2::/64", "100.100.100.200"]}}
)


def policy(**network_policy):
    return parse_sandbox({"id": "sb", "network_policy": network_policy}).policy


CLOSED = policy(
    allow_internet_access=False,
    allow_out=["198.51.100.10", "198.51.100.64/26", "2001:db8:1::/48", "2001:db8:2::7"],
    deny_out=["203.0.113.0/24", "2001:db8:bad::/48"],
)
NAMES = policy(allow_out=["a.example.com", "*.b.example.org", "198.51.100.10"], deny_out=["c.example.net"])
OPEN = policy(
    allow_internet_access=True, allow_out=["0.0.0.0/0"], deny_out=["::/0", "10.0.0.0/9", "10.128.0.0/9"]
)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)


def _libnftables_version() -> str:
    out = sh("nft", "--version", check=False).stdout
    found = re.search(r"v(\d+\.\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


VERSION = _libnftables_version()
# The encoder reproduces libnftables 1.0.6's messages (Debian 12): elsewhere only the listings are compared.
BYTES = STRACE if VERSION == "1.0.6" else None


@pytest.fixture
def namespaces():
    """Two scratch namespaces (libnftables', the raw writer's), each with a veth end named IFACE."""
    names = [f"egnb{os.getpid() % 100000}{side}" for side in "lr"]
    try:
        for ns in names:
            sh("ip", "netns", "delete", ns, check=False)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "add", IFACE, "type", "veth", "peer", "name", "egb-peer0")
        yield names
    finally:
        for ns in names:
            sh("ip", "netns", "delete", ns, check=False)


def listing(ns: str, table: str = TARGET.table, family: str = "netdev") -> list[dict] | None:
    """A table as nft lists it, without what differs between two writes of it (handles, expiries)."""
    out = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", family, table, check=False)
    if out.returncode:
        assert "No such file or directory" in out.stderr, out.stderr
        return None
    items = [i for i in json.loads(out.stdout)["nftables"] if "metainfo" not in i]
    for item in items:
        for obj in item.values():
            obj.pop("handle", None)
            for e in obj.get("elem", ()) if isinstance(obj.get("elem"), list) else ():
                if isinstance(e, dict) and isinstance(e.get("elem"), dict):
                    e["elem"].pop("expires", None)  # a countdown: differs by the time between the writes
    return items


def _attrs(data: bytes, nested_ok: bool = True) -> list:
    out, off = [], 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        value = data[off + 4 : off + length]
        out.append([kind & 0x3FFF, _attrs(value) if kind & 0x8000 else value.hex()])
        off += (length + 3) & ~3
    return out


def _normal(kind: int, attrs: list) -> list:
    """A message's attributes without what is the writer's own: set ids (NEWSET's, NEWSETELEM's, a
    lookup's) and the type numbers of element-list entries."""
    if kind == 9:
        attrs = [a for a in attrs if a[0] != 10]
    elif kind == 12:
        attrs = [[t, [[1, e[1]] for e in v] if t == 3 else v] for t, v in attrs if t != 4]
    elif kind == 6:
        for expr in next((v for t, v in attrs if t == 4), []):
            if [1, b"lookup\0".hex()] in expr[1]:
                expr[1] = [[t, [a for a in v if a[0] != 4]] if t == 2 else [t, v] for t, v in expr[1]]
    return attrs


def messages(batch: bytes) -> list:
    out, off = [], 0
    while off + 16 <= len(batch):
        length, kind, flags, _, _ = struct.unpack_from("=IHHII", batch, off)
        body = batch[off + 16 : off + length]
        out.append([kind, flags & ~0x4, body[:4].hex(), _normal(kind & 0xFF, _attrs(body[4:]))])
        off += (length + 3) & ~3
    return out


def strace_batch(path: Path) -> bytes:
    """What nft sent in its sendmsg calls (its batch), from strace's hex dump."""
    data, inside = bytearray(), False
    for line in (raw.strip() for raw in path.read_text().splitlines()):
        if "sendmsg(" in line:
            inside = True
        elif inside and line.startswith("|"):  # | 00000  14 00 00 00 ...  ascii |
            data += bytes.fromhex(line[9:57].replace(" ", ""))
        elif not line.startswith("*"):  # "* N bytes in buffer i" heads each iovec's dump
            inside = False
    return bytes(data)


class Writers:
    """The same commands both ways: nft -j -f in the first namespace, a BatchSocket in the second."""

    def __init__(self, names: list[str], tmp: Path) -> None:
        self.lib, self.raw = names
        self.tmp = tmp
        self.socket = BatchSocket.open(f"/run/netns/{self.raw}")
        self.compared = 0

    def run(self, commands: list[dict], plain_sets: dict[str, str] | None = None) -> None:
        path, trace = self.tmp / "cmds.json", self.tmp / "strace.txt"
        path.write_text(json.dumps({"nftables": commands}))
        wrap = [BYTES, "-f", "-e", "trace=sendmsg", "-e", "write=all", "-o", str(trace)] if BYTES else []
        out = sh("ip", "netns", "exec", self.lib, *wrap, "nft", "-j", "-f", str(path), check=False)
        assert out.returncode == 0, out.stderr
        self.socket.run(commands, "test", plain_sets)
        if BYTES:
            assert messages(strace_batch(trace)) == messages(encode_batch(commands, 0, plain_sets).data)
            self.compared += 1
        assert listing(self.lib) == listing(self.raw)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def writers(namespaces, tmp_path):
    w = Writers(namespaces, tmp_path)
    yield w
    w.close()


def plain_sets(ruleset, variant: str) -> dict[str, str]:
    """The sets element commands write, as a caller knows them: the DNS sets of the variant in force, the
    learned sets."""
    dns = {f"{n}_{variant}": "ipv4_addr" if n.endswith("4") else "ipv6_addr" for n in ruleset.dns_sets}
    return dns | dict(zip(LEARNED_SETS, ("ipv4_addr", "ipv6_addr"), strict=True))


@pytest.mark.parametrize(
    ("pol", "config"),
    [(CLOSED, Config()), (CLOSED, GUARDED), (NAMES, Config()), (NAMES, RESOLVERS), (OPEN, RESOLVERS)],
    ids=["closed", "closed-guarded", "names", "names-resolvers", "open"],
)
def test_a_first_write_lists_the_same(writers, pol, config):
    ruleset = render(pol, config, host=True)
    elements = {
        n: ["192.0.2.1", "192.0.2.2"] if n.endswith("4") else ["2001:db8::1"] for n in ruleset.dns_sets
    }
    writers.run(plan_replace(ruleset, elements, TARGET).steps[0].commands)
    assert listing(writers.raw) is not None


def test_stage_switch_updates_elements_and_learned_addresses_list_the_same(writers):
    first, second = render(NAMES, Config(), host=True), render(CLOSED, GUARDED, host=True)
    writers.run(plan_replace(first, {"allow_dns4": ["192.0.2.1"]}, TARGET).steps[0].commands)
    writers.run(plan_apply(second, None, listing(writers.lib), TARGET).steps[0].commands)  # staged only
    for ruleset, elements in (
        (second, None),
        (first, {"allow_dns4": ["192.0.2.9"], "deny_dns6": ["2001:db8::9"]}),
    ):
        plan = plan_apply(ruleset, elements, listing(writers.lib), TARGET)
        for step in plan.steps:  # stage (first clearing what was left staged), then switch (retiring)
            writers.run(step.commands)
    variant = plan.written.variant
    step = plan_elements(
        {"allow_dns4": ["192.0.2.10"], "allow_dns6": ["2001:db8::10"]},
        {"allow_dns4": ["192.0.2.9"]},
        variant,
        TARGET,
    )
    writers.run(step.commands, plain_sets(first, variant))
    writers.run(learn_commands({"198.51.100.1": 30, "2001:db8:5::1": 60}, TARGET), plain_sets(first, variant))
    writers.run(learn_commands({"198.51.100.2": 30}, TARGET, replace=True), plain_sets(first, variant))
    learned = next(i["set"] for i in listing(writers.raw) if i.get("set", {}).get("name") == "learned4")
    assert [e["elem"]["val"] for e in learned["elem"]] == ["198.51.100.2"]


LOG_CHAIN = "log_probe_a"  # no chain the renderer makes


def logging_commands(t: dict, deny: str) -> list[dict]:
    """A step's logging chain as the renderer writes one (limit, log, goto deny), and the other forms of
    limit and log the encoder writes: no burst, burst 0 (libnftables sends 5), each period, a log with a
    prefix only, with a group and its options, and with nothing."""
    rules = [
        [{"limit": {"rate": 50, "burst": 100, "per": "second"}}, {"log": {"prefix": "deny_out", "group": 2}},
         {"goto": {"target": deny}}],
        [{"limit": {"rate": 7, "per": "minute"}}, {"log": {"prefix": "guard.private"}}],
        [{"limit": {"rate": 7, "per": "hour", "burst": 0, "rate_unit": "packets"}},
         {"log": {"group": 65535, "snaplen": 64, "queue-threshold": 10}}],
        [{"limit": {"rate": 2**40, "per": "day", "burst": 2**32 - 1}}, {"log": None}, {"jump": {"target": deny}}],
    ]  # fmt: skip
    chain = {"add": {"chain": {**t, "name": LOG_CHAIN}}}
    return [chain, *({"add": {"rule": {**t, "chain": LOG_CHAIN, "expr": expr}}} for expr in rules)]


def test_a_logging_chain_is_sent_and_lists_as_libnftables_writes_it(writers):
    commands = plan_replace(render(CLOSED, Config(), host=True), None, TARGET).steps[0].commands
    writers.run(commands + logging_commands({"family": "netdev", "table": TARGET.table}, "deny_a"))
    rules = [i["rule"]["expr"] for i in listing(writers.raw) if i.get("rule", {}).get("chain") == LOG_CHAIN]
    assert rules[0] == [
        {"limit": {"rate": 50, "burst": 100, "per": "second"}},
        {"log": {"prefix": "deny_out", "group": 2}},
        {"goto": {"target": "deny_a"}},
    ]
    assert [r[0]["limit"]["burst"] for r in rules] == [100, 5, 5, 2**32 - 1]
    assert writers.compared == (1 if BYTES else 0)


def test_a_delete_leaves_nothing_either_way(writers):
    writers.run(plan_replace(render(CLOSED, Config(), host=True), None, TARGET).steps[0].commands)
    writers.run([{"delete": {"table": {"family": "netdev", "name": TARGET.table}}}])
    assert listing(writers.lib) is None and listing(writers.raw) is None


def test_a_refused_batch_changes_nothing(writers):
    ruleset = render(CLOSED, Config(), host=True)
    writers.run(plan_replace(ruleset, None, TARGET).steps[0].commands)
    before = listing(writers.raw)
    t = {"family": "netdev", "table": TARGET.table}
    bad = [
        {"add": {"set": {**t, "name": "extra", "type": "ipv4_addr"}}},
        {"flush": {"chain": {**t, "name": "ingress"}}},
        {"add": {"rule": {**t, "chain": "ingress", "expr": [{"jump": {"target": "missing"}}]}}},
    ]
    with pytest.raises(ApplyError, match=r"No such file or directory \(command 2: add rule netdev"):
        writers.socket.run(bad, "bad batch")
    assert listing(writers.raw) == before
    writers.socket.run([{"delete": {"table": {"family": "netdev", "name": TARGET.table}}}])  # still usable
    assert listing(writers.raw) is None


def test_the_byte_comparison_ran(writers):
    if not BYTES:
        pytest.skip(f"strace missing or libnftables {VERSION} (not 1.0.6): only the listings are compared")
    writers.run(plan_replace(render(NAMES, Config(), host=True), None, TARGET).steps[0].commands)
    assert writers.compared == 1


N_TABLES = 300
REPEATS = 5


def _fill(ns: str, n: int, first: int) -> None:
    """n more realistic host-side tables in ns, each on the ingress hook of its own veth end."""
    links = "".join(f"link add egh{i} type veth peer name egp{i}\n" for i in range(first, first + n))
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=links, text=True, check=True, timeout=120)
    ruleset = render(NAMES, Config(), host=True)
    sock = BatchSocket.open(f"/run/netns/{ns}")
    try:
        for start in range(first, first + n, 50):
            cmds = []
            for i in range(start, min(start + 50, first + n)):
                cmds += (
                    plan_replace(ruleset, {"allow_dns4": ["192.0.2.1"]}, target_for(f"egh{i}"))
                    .steps[0]
                    .commands
                )
            sock.run(cmds, "filler tables")
    finally:
        sock.close()


def _median_ms(write) -> float:
    times = []
    for i in range(REPEATS):
        start = time.perf_counter()
        write(i)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _measure(ns: str, libnft: LibnftBackend, raw: BatchSocket) -> dict[str, float]:
    """ms per write of one table, median of REPEATS, each way on its own interface's table: the replace
    (a first write), an update as the agent writes it (stage then switch, two transactions, planned from
    what it wrote last: no listing), an element update."""
    path = f"/run/netns/{ns}"
    policies = [render(p, Config(), host=True) for p in (NAMES, CLOSED)]
    ways = {
        "libnftables": ("egb-lib", lambda cmds, plain=None: libnft.run(path, cmds, "timed")),
        "raw netlink": ("egb-raw", lambda cmds, plain=None: raw.run(cmds, "timed", plain)),
    }
    out = {}
    for way, (iface, run) in ways.items():
        target = target_for(iface)
        replace = plan_replace(policies[0], None, target)
        out[f"{way} replace"] = _median_ms(lambda i, r=replace, run=run: run(r.steps[0].commands))
        written = [replace.written]

        def update(i, target=target, run=run, written=written):
            plan = plan_after(policies[(i + 1) % 2], None, written[0], target)
            for step in plan.steps:
                run(step.commands)
            written[0] = plan.written

        out[f"{way} update"] = _median_ms(update)
        run(replace.steps[0].commands)
        plain = plain_sets(policies[0], "a")

        def element(i, target=target, run=run, plain=plain):
            delete = {"allow_dns4": [f"192.0.2.{99 + i}"]} if i else {}
            run(plan_elements({"allow_dns4": [f"192.0.2.{100 + i}"]}, delete, "a", target).commands, plain)

        out[f"{way} element"] = _median_ms(element)
    return out


def test_raw_writes_do_not_grow_with_the_host_tables_of_the_namespace(capsys):
    """Not asserted (a shared 2-CPU machine): printed, libnftables against the raw batch, at N = 0 and
    N = 300 host-side tables already in the namespace."""
    ns = f"egnbt{os.getpid() % 100000}"
    sh("ip", "netns", "delete", ns, check=False)
    sh("ip", "netns", "add", ns)
    libnft = LibnftBackend()
    try:
        for iface in ("egb-lib", "egb-raw"):
            sh(
                "ip",
                "-n",
                ns,
                "link",
                "add",
                iface,
                "type",
                "veth",
                "peer",
                "name",
                iface.replace("egb", "egq"),
            )
        raw = BatchSocket.open(f"/run/netns/{ns}")
        before = _measure(ns, libnft, raw)
        _fill(ns, N_TABLES, 0)
        after = _measure(ns, libnft, raw)
        raw.close()
        tables = sh("ip", "netns", "exec", ns, "nft", "list", "tables", "netdev").stdout.count("\n")
        with capsys.disabled():
            print(f"\nhost-side writes, ms (median of {REPEATS}); {tables} netdev tables at the end")
            print(f"{'write':24} {'N = 0':>10} {f'N = {N_TABLES}':>10}")
            for key in before:
                print(f"{key:24} {before[key]:10.2f} {after[key]:10.2f}")
        assert tables == N_TABLES + 2
    finally:
        libnft.close()
        sh("ip", "netns", "delete", ns, check=False)
