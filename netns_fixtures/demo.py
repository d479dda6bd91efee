"""The Quick-start demo: three sandboxes with different policies, and what each of them can really reach.

Builds a throwaway world, applies each policy with `egressd apply` (the real command, as an operator would),
probes every destination with TCP, UDP and ping over both families, and prints the result next to what
egressd's reference decision says. Exits 1 if the kernel and the reference ever disagree. Removes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from egressd.model.config import Config
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.decide import decide
from netns_fixtures.probe import ping, tcp_connect, udp_echo
from netns_fixtures.world import World, cleanup

POLICIES = [
    ("open, deny a range", {"deny_out": ["203.0.113.0/24", "2001:db8:bad::/48"]}),
    ("allowlist only", {"allow_internet_access": False, "allow_out": ["198.51.100.10", "2001:db8:1::10"]}),
    (
        "allow before deny",
        {"allow_out": ["198.51.100.10", "2001:db8:1::10"], "deny_out": ["198.51.100.0/24"]},
    ),
]

DESTINATIONS = [
    ("198.51.100.10", "web server"),
    ("198.51.100.20", "its neighbour"),
    ("203.0.113.5", "another network"),
    ("2001:db8:1::10", "web server, IPv6"),
    ("2001:db8:1::20", "its neighbour, IPv6"),
    ("2001:db8:bad::5", "another network, IPv6"),
    ("10.255.0.2", "private range"),
]


def probe(ns: str, dst: str) -> str:
    """'pass' when TCP, UDP and ICMP all get through, 'deny' when none does, else what differed."""
    got = {
        "tcp": tcp_connect(ns, dst, 80) == "open",
        "udp": udp_echo(ns, dst, 7) == "reply",
        "icmp": ping(ns, dst),
    }
    if all(got.values()):
        return "pass"
    if not any(got.values()):
        return "deny"
    return "mixed(" + ",".join(k for k, v in got.items() if v) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the world up until Enter is pressed")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    prefix = f"egdemo{os.getpid() % 1000}"
    cleanup(prefix)
    mismatches = 0
    t0 = time.monotonic()
    with World(prefix, sandboxes=len(POLICIES)) as world, tempfile.TemporaryDirectory() as tmp:
        print(f"world: {len(world.namespaces)} namespaces built in {world.build_seconds:.2f} s")
        records = []
        for (label, np), sb in zip(POLICIES, world.sandboxes, strict=True):
            records.append({"id": sb.name, "netns": sb.netns_path, "network_policy": np})
            print(f"  {sb.name}: {label:20} {json.dumps(np)}")
        path = os.path.join(tmp, "sandboxes.json")
        with open(path, "w") as f:
            json.dump(records, f)
        print(f"\n$ egressd apply {path}")
        subprocess.run([sys.executable, "-m", "egressd", "apply", path], check=True)

        config = Config()
        policies = [parse_sandbox(r).policy for r in records]
        header = f"{'destination':38}" + "".join(f"{label:>22}" for label, _ in POLICIES)
        print(f"\n{header}\n{'-' * len(header)}")
        for dst, what in DESTINATIONS:
            cells = []
            for sb, policy in zip(world.sandboxes, policies, strict=True):
                got = probe(sb.name, dst)
                verdict = decide(policy, config, dst)
                want = "pass" if verdict.action == "accept" else "deny"
                mark = "" if got == want else " !!"
                mismatches += got != want
                cells.append(f"{got + ' (' + verdict.step + ')' + mark:>22}")
            print(f"{dst + '  ' + what:38}" + "".join(cells))
        print(
            "\npass/deny: TCP, UDP and ping all got through / none did; in brackets, the step that decided."
        )
        if args.keep:
            input("world is up; press Enter to remove it ")
    print(f"removed every namespace of the demo ({time.monotonic() - t0:.1f} s in all)")
    if mismatches:
        print(f"demo: {mismatches} result(s) differ from the reference decision", file=sys.stderr)
        return 1
    print("every result matches egressd's reference decision")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
