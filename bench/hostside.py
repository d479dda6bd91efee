"""Host-side benchmark: what the per-interface host tables cost as sandboxes grow.

egressd's HostBackend (one `netdev` table per sandbox interface, libnftables in-process) against the obvious
baseline in the same run: the same transaction per sandbox written with `ip netns exec NS nft -j -f FILE`.
Both run in throwaway namespaces with N dummy interfaces; which goes first alternates per repeat. For N
sandboxes with K allow_out entries each:

- cold: first write of every sandbox's table, ms per sandbox;
- update: a changed policy for every sandbox (stage and switch), ms per sandbox;
- adopt: a restart's check of every unchanged table (one fingerprint read each), ms per sandbox;
- read: a whole table read, as a resync or the verification pass reads each (over raw netlink), against
  the same read through libnftables (`list table`, which loads every table of the namespace), ms per table;
- shared: for comparison, what one shared table costs per change at the same N (the design egressd tried
  first and dropped: libnftables 1.0.6 loads the whole table before every transaction).

Run as root from the project root: `python -m bench.hostside` (`--smoke` for a tiny run; `--no-baseline`
leaves out the `nft -f` side, which takes over ten minutes at N = 1,000).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.figures import Figure
from egressd.kernel.hostside import HostBackend, target_for
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config
from egressd.model.sandbox import Policy, Targets
from egressd.ruleset.render import render
from egressd.ruleset.transactions import replace_table

CMD_TIMEOUT_S = 60.0


def policy(index: int, entries: int, generation: int) -> Policy:
    """K distinct /32s from the benchmarking range 198.18.0.0/15; `generation` shifts them for an update."""
    base = int(ipaddress.IPv4Address("198.18.0.0")) + generation * 65536
    nets = tuple(ipaddress.IPv4Network(base + 2 * (index * entries + i)) for i in range(entries))
    return Policy(allow_internet_access=False, allow_out=Targets(nets4=nets))


def make_interfaces(ns: str, n: int) -> None:
    """N veth pairs, h0..hN-1 (peers p0..), in one `ip -batch`: devices for the ingress hooks to sit on."""
    batch = "".join(f"link add h{i} type veth peer name p{i}\n" for i in range(n))
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True, timeout=CMD_TIMEOUT_S)


def run_baseline(ns: str, n: int, k: int, generation: int, tmp: Path) -> float:
    """Seconds for N `ip netns exec NS nft -j -f FILE`, each replacing one interface's table whole."""
    config = Config()
    files = []
    for i in range(n):
        ruleset = render(policy(i, k, generation), config, host=True)
        path = tmp / f"b{generation}-{i}.json"
        path.write_text(json.dumps(replace_table(ruleset, None, target_for(f"h{i}"))))
        files.append(path)
    t0 = time.perf_counter()
    for path in files:
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-j", "-f", str(path)], check=True, timeout=CMD_TIMEOUT_S
        )
    return time.perf_counter() - t0


def inner(n: int, k: int) -> dict[str, float]:
    """Runs inside a throwaway namespace: egressd's HostBackend, timed."""
    config = Config()
    backend = LibnftBackend()
    host = HostBackend(backend, config)
    rulesets = [[render(policy(i, k, g), config, host=True) for i in range(n)] for g in (0, 1)]
    out: dict[str, float] = {}
    for label, gen in (("cold", 0), ("update", 1)):
        t0 = time.perf_counter()
        for i in range(n):
            host.apply(f"h{i}", rulesets[gen][i])
        out[label] = time.perf_counter() - t0
    t0 = time.perf_counter()
    matched = sum(host.fingerprint(f"h{i}") == rulesets[1][i].fingerprint for i in range(n))
    out["adopt"] = time.perf_counter() - t0
    out["adopted"] = matched
    libnft = HostBackend(backend, config, raw=False)  # the same tables, read through libnftables
    for label, reader in (("read", host), ("read_libnft", libnft)):
        t0 = time.perf_counter()
        listed = sum(reader.read(f"h{i}") is not None for i in range(n))
        out[label] = time.perf_counter() - t0
        out[f"{label}_tables"] = listed
    backend.close()
    return out


def run_ours(ns: str, n: int, k: int) -> dict[str, float]:
    proc = subprocess.run(
        [
            "ip", "netns", "exec", ns, sys.executable, "-m", "bench.hostside", "--inner",
            "--sandboxes", str(n), "--entries", str(k),
        ],
        check=True, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _netns(name: str, op: str) -> None:
    subprocess.run(["ip", "netns", op, name], check=op == "add", timeout=CMD_TIMEOUT_S, capture_output=True)


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: ms per sandbox for the host-side tables,
    against `ip netns exec NS nft -j -f FILE` in the same run (medians over the repeats)."""
    n, k, reps = results.get("sandboxes"), results.get("entries"), results.get("repeats")
    base = "ip netns exec NS nft -j -f FILE, per sandbox"
    note = f"median of {reps} repeats"
    out = [
        Figure("hostside", f"host-side table {label}, N={n} K={k}, ms per sandbox", "ms",
               results.get(f"{label}_ms_per_sandbox"), results.get(f"base_{label}_ms_per_sandbox"), base,
               note=note)
        for label in ("cold", "update")
    ]  # fmt: skip
    out.append(
        Figure(
            "hostside",
            f"host-side adopt on restart, N={n}, ms per sandbox",
            "ms",
            results.get("adopt_ms_per_sandbox"),
            note=f"{results.get('adopted')}/{n} adopted; {note}",
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sandboxes", type=int, default=1000)
    ap.add_argument("--entries", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny and quick: N=20, one repeat")
    ap.add_argument("--no-baseline", action="store_true", help="egressd only, no `nft -f` side")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sandboxes, args.repeats = 20, 1
    if args.inner:
        print(json.dumps(inner(args.sandboxes, args.entries)))
        return 0
    if os.geteuid() != 0:
        print("bench.hostside: run as root (it makes throwaway network namespaces)", file=sys.stderr)
        return 2
    n, k = args.sandboxes, args.entries
    runs: list[dict[str, float]] = []
    tag = f"bhs{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="bench-hostside-") as tmpdir:
        for rep in range(args.repeats):
            ours_ns, base_ns = f"{tag}o{rep}", f"{tag}b{rep}"
            try:
                for ns in (ours_ns,) if args.no_baseline else (ours_ns, base_ns):
                    _netns(ns, "add")
                    make_interfaces(ns, n)
                row: dict[str, float] = {}
                steps = ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours")
                for step in ("ours",) if args.no_baseline else steps:
                    if step == "ours":
                        row.update(run_ours(ours_ns, n, k))
                    else:
                        row["base_cold"] = run_baseline(base_ns, n, k, 0, Path(tmpdir))
                        row["base_update"] = run_baseline(base_ns, n, k, 1, Path(tmpdir))
                runs.append(row)
            finally:
                _netns(ours_ns, "delete")
                _netns(base_ns, "delete")

    def per_sandbox_ms(key: str) -> float:
        return statistics.median(r[key] for r in runs) / n * 1000

    result: dict[str, Any] = {"sandboxes": n, "entries": k, "repeats": len(runs)}
    for key in ("cold", "update", "adopt", "read", "read_libnft", "base_cold", "base_update"):
        if key in runs[0]:
            result[f"{key}_ms_per_sandbox"] = per_sandbox_ms(key)
    result["adopted"] = min(r["adopted"] for r in runs)
    result["read_tables"] = min(min(r["read_tables"], r["read_libnft_tables"]) for r in runs)
    print(f"host-side tables, N={n} sandboxes, K={k} entries, median of {len(runs)}")
    print(f"{'ms per sandbox':24}{'egressd':>10}{'nft -f':>10}{'ratio':>8}")
    for label in ("cold", "update"):
        ours_ms, base_ms = result[f"{label}_ms_per_sandbox"], result.get(f"base_{label}_ms_per_sandbox")
        if base_ms is None:
            print(f"{label:24}{ours_ms:10.2f}")
            continue
        result[f"{label}_ratio"] = base_ms / ours_ms
        print(f"{label:24}{ours_ms:10.2f}{base_ms:10.2f}{base_ms / ours_ms:7.1f}x")
    print(f"{'adopt (restart)':24}{result['adopt_ms_per_sandbox']:10.2f}   ({result['adopted']}/{n} adopted)")
    raw_ms, lib_ms = result["read_ms_per_sandbox"], result["read_libnft_ms_per_sandbox"]
    result["read_ratio"] = lib_ms / raw_ms
    print(
        f"{'read (whole table)':24}{raw_ms:10.2f}   (libnftables {lib_ms:.2f}, {lib_ms / raw_ms:.1f}x;",
        end=" ",
    )
    print(f"{result['read_tables']}/{n} read)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
