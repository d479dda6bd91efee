"""Datapath benchmark: iperf3 out of a sandbox with egressd's table, with no rules, and with a linear chain.

The issue's question: with 10,000 CIDRs in allow_out, does traffic still flow at (nearly) the speed of an
empty namespace, and how does that compare with the chain of one rule per CIDR that operators write by hand?
Every configuration gets its own sandbox namespace with an identical veth to one server namespace, so rules
are loaded once and configurations cannot leak into each other; the order of configurations flips every
repeat so machine noise lands on all of them. Run as root from the project root: `python -m bench.datapath`
(see bench/README.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.apply import (
    NETNS_DIR,
    Aborted,
    Deadline,
    Namespaces,
    began,
    cli_fingerprint,
    machine_info,
    run,
    set_elements,
)
from bench.figures import Figure
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config, Denials
from egressd.model.entries import IPNetwork
from egressd.model.sandbox import Policy, Targets
from egressd.ruleset.render import render
from netns_fixtures._nsutil import set_parent_death_signal
from netns_fixtures.probe import tcp_probe

# Traffic only ever goes to these documentation addresses, all on the server namespace's loopback. Filler
# allow entries come from 198.18.0.0/15 (RFC 2544) and 2001:db8:0::/48, which nothing in the topology uses.
ALLOWED = {"v4": "198.51.100.10", "v6": "2001:db8:2::10"}
DENIED = {"v4": "203.0.113.10", "v6": "2001:db8:3::10"}
SERVER_ROUTES = {"v4": ("198.51.100.0/24", "203.0.113.0/24"), "v6": ("2001:db8:2::/48", "2001:db8:3::/48")}
FILLER4 = ipaddress.IPv4Network("198.18.0.0/15")
FILLER6 = ipaddress.IPv6Network("2001:db8::/48")
MAX_ENTRIES = 32_768  # every other /64 of FILLER6's first /48, so no two entries collapse
# Measured runs: (address family, protocol). TCP is what bulk traffic does (segments of up to 64 KiB pass the
# hooks, see README); UDP with MTU-sized datagrams makes every packet pay the rule set on its own.
RUNS = {"v4": ("v4", "tcp"), "v6": ("v6", "tcp"), "udp4": ("v4", "udp")}
RUN_LABELS = {"v4": "v4", "v6": "v6", "udp4": "v4 UDP"}
UDP_LEN = 1400
# One iperf3 server per family, bound to the allowed address: a wildcard UDP socket would answer from the
# veth's address, and the client, connected to the allowed one, would never see the reply.
IPERF_PORTS = {"v4": 5201, "v6": 5202}
ECHO_PORT = 7
PROBE_TIMEOUT_S = 0.5
FRACTION_GOAL = 0.95  # egressd >= 95 % of no ruleset
TIMES_GOAL = 5.0  # "many times the linear chain": counted as met from 5x
HEADLINE_LINEAR = "nft-linear"
# What any stateful rule set costs before its first decision: egressd's table matches `ct direction`, which
# turns connection tracking on in the namespace, as does the ESTABLISHED shortcut. Filters nothing.
CONNTRACK_ONLY = """table inet ed_ct {
    chain output {
        type filter hook output priority 0; policy accept;
        ct state established,related accept
    }
}
"""


@dataclass(frozen=True)
class Setup:
    """One configuration: a sandbox namespace and what is loaded into it."""

    key: str
    label: str
    kind: str  # none | conntrack | egressd | iptables
    tool: str = ""  # iptables-nft | iptables-legacy
    established: bool = False
    log: bool = True  # egressd: [denials] log (the logging chains sit on deny paths only)


SETUPS = (
    Setup("none", "no ruleset", "none"),
    Setup("conntrack", "conntrack only (reference, no filter)", "conntrack"),
    Setup("egressd", "egressd table (sets)", "egressd"),
    Setup("egressd-nolog", "egressd table, [denials] log = false", "egressd", log=False),
    Setup("nft-linear", "iptables-nft, linear chain", "iptables", "iptables-nft"),
    Setup("legacy-linear", "iptables-legacy, linear chain", "iptables", "iptables-legacy"),
    Setup("nft-linear-est", "iptables-nft, ESTABLISHED first", "iptables", "iptables-nft", True),
    Setup("legacy-linear-est", "iptables-legacy, ESTABLISHED first", "iptables", "iptables-legacy", True),
)


def filler(count: int) -> dict[str, list[IPNetwork]]:
    """`count` allow entries per family, the allowed server address last: never adjacent, so none collapse."""
    v4 = [ipaddress.IPv4Network((int(FILLER4.network_address) + 2 * i, 32)) for i in range(count - 1)]
    v6 = [
        ipaddress.IPv6Network((int(FILLER6.network_address) + ((2 * i) << 64), 64)) for i in range(count - 1)
    ]
    return {
        "v4": [*v4, ipaddress.IPv4Network(f"{ALLOWED['v4']}/32")],
        "v6": [*v6, ipaddress.IPv6Network(f"{ALLOWED['v6']}/128")],
    }


def iptables_rules(nets: Sequence[IPNetwork], family: str, established: bool) -> str:
    """The chain an operator writes: loopback (and IPv6 neighbour discovery) first, like egressd's own table,
    then optionally the ESTABLISHED shortcut, one ACCEPT per CIDR in list order, and DROP."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines.append("-A OUTPUT -o lo -j ACCEPT")
    if family == "v6":
        for t in ("neighbour-solicitation", "neighbour-advertisement"):
            lines.append(f"-A OUTPUT -p ipv6-icmp --icmpv6-type {t} -j ACCEPT")
    if established:
        lines.append("-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    lines += [f"-A OUTPUT -d {net} -j ACCEPT" for net in nets]
    lines += ["-A OUTPUT -j DROP", "COMMIT", ""]
    return "\n".join(lines)


class Topology(Namespaces):
    """A server namespace and one sandbox per configuration, each on its own veth; names ed-<pid>-*.

    Nothing is connected to the machine's own network: every veth is made inside the server namespace with its
    peer sent straight into a sandbox, and each sandbox routes only the two documentation prefixes above.
    """

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"ed-{os.getpid()}-"
        self.server = f"{self.prefix}srv"
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, name: str, deadline: Deadline) -> None:
        if (NETNS_DIR / name).exists():
            raise RuntimeError(f"namespace {name} already exists and is not ours; refusing to use it")
        run(["ip", "netns", "add", name], deadline, "namespace setup")
        self.names.append(name)
        # No duplicate address detection: addresses are usable at once, and link-local ND is not delayed.
        run(
            [
                *("ip", "netns", "exec", name, "sysctl", "-q", "-w"),
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
            deadline,
            "namespace setup",
        )
        run(["ip", "-n", name, "link", "set", "lo", "up"], deadline, "namespace setup")

    def build(self, setups: Sequence[Setup], deadline: Deadline) -> dict[str, str]:
        """The namespaces, links and addresses; returns config key -> sandbox namespace."""
        self.add(self.server, deadline)
        ip_s = ["ip", "-n", self.server]
        for addr in (*ALLOWED.values(), *DENIED.values()):
            plen = 128 if ":" in addr else 32
            run([*ip_s, "addr", "add", f"{addr}/{plen}", "dev", "lo"], deadline, "namespace setup")
        out: dict[str, str] = {}
        for i, s in enumerate(setups):
            sb = f"{self.prefix}{s.key}"
            self.add(sb, deadline)
            out[s.key] = sb
            host_if = f"sb{i}"
            # Distinct ifindexes on both ends: with equal ones the carrier change is delayed (see World).
            run(
                [
                    *ip_s,
                    "link",
                    "add",
                    host_if,
                    "index",
                    str(100 + i),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    sb,
                    "index",
                    str(200 + i),
                ],
                deadline,
                "namespace setup",
            )
            gw4, me4 = f"192.0.2.{4 * i + 1}", f"192.0.2.{4 * i + 2}"
            gw6, me6 = f"2001:db8:1:{i}::1", f"2001:db8:1:{i}::2"
            ip_b = ["ip", "-n", sb]
            for argv in (
                [*ip_s, "addr", "add", f"{gw4}/30", "dev", host_if],
                [*ip_s, "addr", "add", f"{gw6}/64", "dev", host_if, "nodad"],
                [*ip_s, "link", "set", host_if, "up"],
                [*ip_b, "addr", "add", f"{me4}/30", "dev", "eth0"],
                [*ip_b, "addr", "add", f"{me6}/64", "dev", "eth0", "nodad"],
                [*ip_b, "link", "set", "eth0", "up"],
                *([*ip_b, "route", "add", p, "via", gw4] for p in SERVER_ROUTES["v4"]),
                *([*ip_b, "-6", "route", "add", p, "via", gw6] for p in SERVER_ROUTES["v6"]),
            ):
                run(argv, deadline, "namespace setup")
        return out

    def spawn(self, argv: Sequence[str], ready: str | None = None) -> subprocess.Popen[bytes]:
        """A server in the server namespace that dies with this process (parent-death signal, stdin EOF).

        Its stdout is read only for the `ready` line: iperf3 -s reports every test there, and a pipe nobody
        reads fills up after some dozens of tests and blocks the server mid-test.
        """
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.server, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL if ready is None else subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=set_parent_death_signal,
        )
        self.procs.append(proc)
        if ready is not None and proc.stdout is not None:
            line = proc.stdout.readline().decode(errors="replace").strip()
            if line != ready:
                raise RuntimeError(f"{argv[0]} in {self.server} did not start: {line!r}")
        return proc

    def wait_listening(self, port: int, deadline: Deadline) -> None:
        """Until something listens on `port` in the server namespace: iperf3 says nothing when ready."""
        for _ in range(100):
            ss = run(
                ["ip", "netns", "exec", self.server, "ss", "-Htln", f"sport = :{port}"],
                deadline,
                "server start",
            )
            if ss.stdout.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on port {port} in {self.server}")

    def close(self) -> list[str]:
        """Stop our servers, then delete our namespaces; never raises (runs in finally)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()
        return self.delete()


# --- loading and checking each configuration ----------------------------------------------------------


def load_conntrack(ns: str, deadline: Deadline) -> dict[str, Any]:
    """The conntrack-only reference table, read back so we know it is there."""
    run(["ip", "netns", "exec", ns, "nft", "-f", "-"], deadline, "load", stdin=CONNTRACK_ONLY)
    listed = run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "ed_ct"], deadline, "load")
    if "ct state established,related accept" not in listed.stdout:
        raise RuntimeError(f"conntrack-only table in {ns} is not as loaded: {listed.stdout!r}")
    return {"table": "inet ed_ct"}


def load_egressd(
    ns: str, nets: dict[str, list[IPNetwork]], deadline: Deadline, log: bool = True
) -> dict[str, Any]:
    """Render the policy and apply it the way the agent does; check it is in force in that namespace."""
    policy = Policy(allow_internet_access=False, allow_out=Targets.from_entries([*nets["v4"], *nets["v6"]]))
    expect = len(nets["v4"]) + len(nets["v6"])
    if (got := len(policy.allow_out.nets4) + len(policy.allow_out.nets6)) != expect:
        raise RuntimeError(f"{expect} allow entries collapsed to {got}")
    ruleset = render(policy, Config(denials=Denials(log=log)))
    path = str(NETNS_DIR / ns)
    backend = LibnftBackend()
    try:
        t0 = time.perf_counter()
        backend.apply(path, ruleset)
        apply_s = time.perf_counter() - t0
        fp = backend.fingerprint(path)
        elements = set_elements(backend.read(path) or [])
    finally:
        backend.close()
    cli = cli_fingerprint(ns, deadline)  # read by the nft CLI inside the sandbox: the table is really there
    if fp != ruleset.fingerprint or cli != ruleset.fingerprint or elements != expect:
        raise RuntimeError(f"egressd table in {ns}: fingerprint {fp!r} / CLI {cli!r}, {elements} elements")
    return {"entries": expect, "set_elements": elements, "fingerprint": fp, "apply_seconds": apply_s}


def load_iptables(
    ns: str, setup: Setup, nets: dict[str, list[IPNetwork]], families: Sequence[str], deadline: Deadline
) -> dict[str, Any]:
    """One iptables-restore per family inside the namespace, then count the rules it holds."""
    flavour = setup.tool.split("-", 1)[1]
    out: dict[str, Any] = {"tool": setup.tool}
    for fam in families:
        prog = "iptables" if fam == "v4" else "ip6tables"
        text = iptables_rules(nets[fam], fam, setup.established)
        t0 = time.perf_counter()
        run(["ip", "netns", "exec", ns, f"{prog}-{flavour}-restore"], deadline, "load", stdin=text)
        load_s = time.perf_counter() - t0
        saved = run(["ip", "netns", "exec", ns, f"{prog}-{flavour}-save", "-t", "filter"], deadline, "load")
        rules = sum(1 for line in saved.stdout.splitlines() if line.startswith("-A OUTPUT"))
        want = text.count("\n-A OUTPUT")
        if rules != want:
            raise RuntimeError(f"{prog}-{flavour} in {ns}: {rules} OUTPUT rules, expected {want}")
        out[fam] = {"rules": rules, "load_seconds": load_s}
    return out


def enforcement(ns: str, setup: Setup, families: Sequence[str]) -> dict[str, Any]:
    """Connect to the echo server at the allowed and at the denied address.

    With no ruleset both must answer (proves the probe can tell); everywhere else the allowed one must and
    the denied one must not, so no figure comes from an open box.
    """
    out: dict[str, Any] = {}
    for fam in families:
        allowed = tcp_probe(ns, ALLOWED[fam], ECHO_PORT, PROBE_TIMEOUT_S).result
        denied = tcp_probe(ns, DENIED[fam], ECHO_PORT, PROBE_TIMEOUT_S).result
        want_denied_open = setup.kind in ("none", "conntrack")
        ok = allowed == "open" and (denied == "open") == want_denied_open
        out[fam] = {"allowed": allowed, "denied": denied, "ok": ok}
    return out


def iperf(ns: str, run_key: str, seconds: int, deadline: Deadline) -> dict[str, Any]:
    """One iperf3 run from the sandbox to the allowed address.

    TCP: the receiver's bits/s. UDP (unlimited rate): the sender's, because every datagram passes the output
    hook inside sendmsg, so the rule set's per-packet cost slows the sender itself; what the receiver got (two
    CPUs shared with the sender, so it loses some) is recorded next to it.
    """
    fam, proto = RUNS[run_key]
    argv = ["ip", "netns", "exec", ns, "iperf3", "-c", ALLOWED[fam], "-p", str(IPERF_PORTS[fam])]
    argv += ["-t", str(seconds), "-J", "--connect-timeout", "2000"]
    if proto == "udp":
        argv += ["-u", "-b", "0", "-l", str(UDP_LEN)]
    if seconds >= 3:
        argv += ["-O", "1"]  # leave slow start out of the figure
    last = ""
    for attempt in range(2):  # the server may still be tidying up the previous test
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                timeout=min(seconds + 15, deadline.timeout("iperf3")),
            )
        except subprocess.TimeoutExpired:
            deadline.check("iperf3")  # says so when it was --max-seconds that ran out
            raise Aborted(f"iperf3 in {ns} timed out") from None
        try:
            doc = json.loads(proc.stdout)
        except json.JSONDecodeError:
            doc = {"error": proc.stderr.strip() or proc.stdout[-200:]}
        if proc.returncode == 0 and "error" not in doc:
            end = doc["end"]
            sent, received = end["sum_sent"], end["sum_received"]
            return {
                "gbps": (sent if proto == "udp" else received)["bits_per_second"] / 1e9,
                "sent_gbps": sent["bits_per_second"] / 1e9,
                "received_gbps": received["bits_per_second"] / 1e9,
                "retransmits": sent.get("retransmits"),
                "lost_percent": received.get("lost_percent"),
                "error": None,
                "attempts": attempt + 1,
            }
        last = str(doc.get("error", proc.stderr.strip()))
        time.sleep(0.5)
    return {"gbps": None, "error": last, "attempts": 2}


# --- reporting -----------------------------------------------------------------------------------------


def medians(
    samples: list[dict[str, Any]], setups: Sequence[Setup], families: Sequence[str]
) -> dict[str, Any]:
    """Per family and configuration: per-repeat Gbit/s, median, and ratio to no ruleset."""
    out: dict[str, Any] = {}
    for fam in families:
        rows: dict[str, Any] = {}
        for s in setups:
            values = [x["gbps"] for x in samples if x["family"] == fam and x["config"] == s.key]
            good = [v for v in values if v is not None]
            rows[s.key] = {"label": s.label, "per_repeat_gbps": values, "median_gbps": _median(good)}
        base = rows.get("none", {}).get("median_gbps")
        base_reps = rows.get("none", {}).get("per_repeat_gbps", [])
        for row in rows.values():
            m = row["median_gbps"]
            row["ratio_to_none"] = m / base if m is not None and base else None
            # The same ratio taken within each repeat, then the median: drift between repeats cancels.
            pairs = [v / b for v, b in zip(row["per_repeat_gbps"], base_reps, strict=False) if v and b]
            row["paired_ratio_to_none"] = _median(pairs)
        out[fam] = rows
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's two goals on the IPv4 figures (the v6 ones are in the table)."""
    rows = results.get("v4", {})

    def med(key: str) -> float | None:
        return rows.get(key, {}).get("median_gbps")

    e, none, linear = med("egressd"), med("none"), med(HEADLINE_LINEAR)
    frac = e / none if e is not None and none else None
    times = e / linear if e is not None and linear else None
    return {
        "egressd_vs_none": {
            "ratio": frac,
            "goal": FRACTION_GOAL,
            "met": None if frac is None else frac >= FRACTION_GOAL,
        },
        "egressd_vs_linear": {
            "baseline": HEADLINE_LINEAR,
            "ratio": times,
            "goal": TIMES_GOAL,
            "met": None if times is None else times >= TIMES_GOAL,
        },
    }


def table(results: dict[str, Any], entries: int) -> str:
    """Plain text: one block per family."""
    head = f"{'configuration':<54} {'median Gbit/s':>13} {'vs none':>8} {'paired':>8}  per repeat"
    lines = [head, "-" * (len(head) + 20)]
    for fam, rows in results.items():
        for key, row in rows.items():
            med, ratio, paired = row["median_gbps"], row["ratio_to_none"], row["paired_ratio_to_none"]
            reps = " ".join("fail" if v is None else f"{v:.2f}" for v in row["per_repeat_gbps"])
            with_k = key not in ("none", "conntrack")
            name = f"{RUN_LABELS[fam]} {row['label']}" + (f", K={entries}" if with_k else "")
            lines.append(
                f"{name:<54} {'-' if med is None else f'{med:.2f}':>13} "
                f"{'-' if ratio is None else f'{100 * ratio:.1f} %':>8} "
                f"{'-' if paired is None else f'{100 * paired:.1f} %':>8}  {reps}"
            )
        lines.append("")
    return "\n".join(lines)


def summary(results: dict) -> list[Figure]:
    """Headline figures from the dict `--json` wrote: egressd against no ruleset and the linear chains."""
    k = results.get("settings", {}).get("entries")
    rows = results.get("results", {}).get("v4", {})

    def med(key: str) -> float | None:
        return rows.get(key, {}).get("median_gbps")

    e, none, linear, legacy = med("egressd"), med("none"), med(HEADLINE_LINEAR), med("legacy-linear")
    name = f"TCP throughput IPv4, {k} CIDRs in allow_out"
    figures = [
        Figure(
            "datapath",
            f"{name}, vs no ruleset",
            "Gbit/s",
            e,
            none,
            "no ruleset",
            ">= 95 % of no ruleset",
            None if e is None or not none else e / none >= FRACTION_GOAL,
            lower_is_better=False,
        ),
        Figure(
            "datapath",
            f"{name}, vs iptables-nft linear chain",
            "Gbit/s",
            e,
            linear,
            f"iptables-nft, {k} linear OUTPUT rules",
            "many times the linear chain",
            None if e is None or not linear else e / linear >= TIMES_GOAL,
            lower_is_better=False,
            note=f"met means at least {TIMES_GOAL:g}x",
        ),
    ]
    if legacy is not None:
        figures.append(
            Figure(
                "datapath",
                f"{name}, vs iptables-legacy linear chain",
                "Gbit/s",
                e,
                legacy,
                f"iptables-legacy, {k} linear OUTPUT rules",
                lower_is_better=False,
            )
        )
    rows6 = results.get("results", {}).get("v6", {})
    e6, none6 = (rows6.get(key, {}).get("median_gbps") for key in ("egressd", "none"))
    if e6 is not None and none6:
        figures.append(
            Figure(
                "datapath",
                f"TCP throughput IPv6, {k} CIDRs in allow_out, vs no ruleset",
                "Gbit/s",
                e6,
                none6,
                "no ruleset",
                ">= 95 % of no ruleset",
                e6 / none6 >= FRACTION_GOAL,
                lower_is_better=False,
            )
        )
    udp = results.get("results", {}).get("udp4", {})
    eu = udp.get("egressd", {}).get("median_gbps")
    for key, base_name in (
        ("none", "no ruleset"),
        (HEADLINE_LINEAR, f"iptables-nft, {k} linear OUTPUT rules"),
    ):
        base = udp.get(key, {}).get("median_gbps")
        if eu is not None and base:
            figures.append(
                Figure(
                    "datapath",
                    f"UDP {UDP_LEN} B datagrams sent IPv4, {k} CIDRs, vs {base_name.split(',')[0]}",
                    "Gbit/s",
                    eu,
                    base,
                    base_name,
                    lower_is_better=False,
                    note="every datagram pays the rule set: the per-packet cost",
                )
            )
    return figures


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__.splitlines()[0])
    p.add_argument(
        "--entries", type=int, default=10_000, metavar="K", help="allow entries per family (10000)"
    )
    p.add_argument("--repeats", type=int, default=5, metavar="R", help="medians over R repeats (default 5)")
    p.add_argument("--seconds", type=int, default=3, metavar="S", help="seconds per iperf3 run (default 3)")
    p.add_argument("--no-v6", action="store_true", help="no IPv6 TCP run (v6 is still checked)")
    p.add_argument("--no-udp", action="store_true", help="no UDP run")
    p.add_argument(
        "--no-established", action="store_true", help="skip the chains with the ESTABLISHED shortcut"
    )
    p.add_argument("--max-seconds", type=float, default=600.0, help="abort cleanly after this (default 600)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every sample and machine info here")
    p.add_argument("--smoke", action="store_true", help="K=100, 1 s runs, 1 repeat, no v6 run: about 20 s")
    args = p.parse_args(argv)
    if args.smoke:
        args.entries, args.repeats, args.seconds, args.no_v6 = 100, 1, 1, True
    if args.repeats < 1 or args.seconds < 1 or args.max_seconds <= 0:
        p.error("--repeats, --seconds and --max-seconds must be positive")
    if not 1 <= args.entries <= MAX_ENTRIES:
        p.error(f"--entries must be 1..{MAX_ENTRIES}")
    return args


def available(setup: Setup) -> str | None:
    """Why a configuration cannot run here, or None."""
    if setup.kind == "iptables":
        flavour = setup.tool.split("-", 1)[1]
        for prog in (f"iptables-{flavour}-restore", f"ip6tables-{flavour}-restore"):
            if shutil.which(prog) is None:
                return f"{prog} not installed"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """0: complete and every enforcement check held (goals are reported, not enforced); 1: a check or a run
    failed; 2: could not run, or aborted."""
    args = parse_args(argv)
    if not began("datapath"):
        return 2
    if shutil.which("iperf3") is None:
        print("bench.datapath: needs iperf3 (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    started = time.monotonic()
    deadline = Deadline(started + args.max_seconds)
    runs = [r for r in RUNS if not (r == "v6" and args.no_v6) and not (r == "udp4" and args.no_udp)]
    # Rules are loaded and enforcement is checked for both families whatever is measured.
    families = ["v4", "v6"]
    setups = [s for s in SETUPS if not (args.no_established and s.established)]
    skipped = {s.key: why for s in setups if (why := available(s))}
    setups = [s for s in setups if s.key not in skipped]
    nets = filler(args.entries)
    info = machine_info()
    topo = Topology()
    loaded: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    aborted: str | None = None
    try:
        sandboxes = topo.build(setups, deadline)
        topo.spawn([sys.executable, "-m", "netns_fixtures.server", "--tcp", str(ECHO_PORT)], ready="READY")
        for fam, port in IPERF_PORTS.items():
            topo.spawn(["iperf3", "-s", "-B", ALLOWED[fam], "-p", str(port)])
        for s in list(setups):
            deadline.check("load")
            ns = sandboxes[s.key]
            if s.kind == "egressd":
                loaded[s.key] = load_egressd(ns, nets, deadline, log=s.log)
            elif s.kind == "conntrack":
                loaded[s.key] = load_conntrack(ns, deadline)
            elif s.kind == "iptables":
                try:
                    loaded[s.key] = load_iptables(ns, s, nets, families, deadline)
                except RuntimeError as e:  # e.g. no x_tables in this kernel: a baseline less, not a failure
                    skipped[s.key] = str(e)
                    setups.remove(s)
        for port in IPERF_PORTS.values():
            topo.wait_listening(port, deadline)
        for s in setups:
            checks[s.key] = enforcement(sandboxes[s.key], s, families)
        for r in range(args.repeats):
            order = setups if r % 2 == 0 else setups[::-1]
            fams = runs if r % 2 == 0 else runs[::-1]
            for fam in fams:
                for s in order:
                    got = iperf(sandboxes[s.key], fam, args.seconds, deadline)
                    samples.append({"repeat": r, "family": fam, "config": s.key, **got})
                    if got["error"]:
                        errors.append(f"repeat {r} {fam} {s.key}: {got['error']}")
    except Aborted as e:
        aborted = str(e)
    except KeyboardInterrupt as e:
        aborted = f"interrupted ({e or 'SIGINT'})"
    except (RuntimeError, OSError) as e:  # setup or egressd's table failed: report it, still clean up
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        for line in topo.close():
            print(f"bench.datapath: could not delete namespace {line}", file=sys.stderr)
    wall = time.monotonic() - started

    results = medians(samples, setups, runs)
    met = goals(results)
    checks_ok = bool(checks) and all(c[f]["ok"] for c in checks.values() for f in c)
    print(
        f"egressd datapath benchmark: iperf3 out of a sandbox namespace over a veth (TCP; UDP: {UDP_LEN} B "
        f"datagrams, sender's rate), {args.seconds} s runs, median over {args.repeats} repeats; "
        f"K={args.entries} allow entries per family, server's last"
    )
    print(
        f"{info['nproc']} CPUs, kernel {info['kernel']}, {info['nft']}, Python {info['python']}; "
        f"iptables-nft = the Debian 12 default `iptables`; ESTABLISHED first = "
        f"`-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT` before the CIDR rules"
    )
    for key, why in skipped.items():
        print(f"skipped {key}: {why}")
    print()
    print(table(results, args.entries))
    for key, c in checks.items():
        words = ", ".join(f"{f} allowed {c[f]['allowed']} / denied {c[f]['denied']}" for f in c)
        print(f"enforcement {key:<18} {'ok' if all(c[f]['ok'] for f in c) else 'FAILED'}: {words}")
    f, t = met["egressd_vs_none"], met["egressd_vs_linear"]
    if f["ratio"] is not None:
        print(
            f"goal egressd >= 95 % of no ruleset (v4): {100 * f['ratio']:.1f} % -> "
            f"{'met' if f['met'] else 'NOT met'}"
        )
    if t["ratio"] is not None:
        print(f"goal egressd many times the linear chain (v4, {HEADLINE_LINEAR}): {t['ratio']:.1f}x")
    for e in errors:
        print(f"error: {e}")
    status = f"ABORTED: {aborted}" if aborted else "complete"
    print(f"wall time {wall:.1f} s ({status}); enforcement checks passed: {checks_ok}")
    if args.json:
        doc = {
            "machine": info,
            "settings": {
                "entries": args.entries,
                "repeats": args.repeats,
                "seconds": args.seconds,
                "runs": {r: RUNS[r] for r in runs},
                "udp_datagram_bytes": UDP_LEN,
                "max_seconds": args.max_seconds,
                "smoke": args.smoke,
            },
            "topology": {
                "allowed": ALLOWED,
                "denied": DENIED,
                "sandbox_links": "192.0.2.(4i+2)/30, 2001:db8:1:i::2/64 for configuration i; server .1, ::1",
            },
            "configs": {
                s.key: {"label": s.label, "kind": s.kind, "tool": s.tool, "established": s.established}
                for s in setups
            },
            "skipped": skipped,
            "loaded": loaded,
            "enforcement": checks,
            "enforcement_ok": checks_ok,
            "samples": samples,
            "results": results,
            "goals": met,
            "errors": errors,
            "wall_seconds": wall,
            "aborted": aborted,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if aborted:
        return 2
    return 0 if checks_ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
