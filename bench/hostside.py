"""Host-side table benchmark: what one shared `inet egressd_host` table costs as sandboxes grow.

egressd's HostSide (in-memory mirror, one stage and one switch transaction per change) against the obvious
baseline, in the same run: the same commands per sandbox written with `ip netns exec NS nft -j -f FILE`.
Both run in throwaway namespaces; which goes first alternates per repeat. Figures, for N sandboxes with K
allow_out entries each:

- cold: first write of every sandbox, ms per sandbox;
- update: a changed policy for every sandbox, ms per sandbox;
- restart: a fresh HostSide adopting all N unchanged groups (one read of the whole table), total ms and
  writes (must be 0);
- read: one listing of the whole table, ms.

Run as root from the project root: `python -m bench.hostside` (`--smoke` for a tiny run).
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
import uuid
from pathlib import Path
from typing import Any

from egressd.config import Config
from egressd.hostside import HostSide, base_commands, stage_commands
from egressd.nft import LibnftBackend
from egressd.policy import Policy, Targets
from egressd.render import render

CMD_TIMEOUT_S = 60.0


def policy(index: int, entries: int, generation: int) -> Policy:
    """K distinct /32s from the benchmarking range 198.18.0.0/15; `generation` shifts them for an update."""
    base = int(ipaddress.IPv4Address("198.18.0.0")) + generation * 65536
    nets = tuple(ipaddress.IPv4Network(base + 2 * (index * entries + i)) for i in range(entries))
    return Policy(allow_internet_access=False, allow_out=Targets(nets4=nets))


def baseline_file(sid: str, iface: str, pol: Policy, config: Config, first: bool, update: bool) -> str:
    """What a hand-written tool would send: the group and its dispatch element, in one `nft -f` file."""
    ruleset = render(pol, config, host=True)
    group = f"b{uuid.uuid4().hex[:12]}_{sid}"
    cmds = [*(base_commands() if first else []), *stage_commands(ruleset, group, {})]
    cmds.append(
        {"add": {"element": {"family": "inet", "table": "egressd_host", "name": "dispatch",
                             "elem": [[iface, {"jump": {"target": f"{group}_decide"}}]]}}}
    )  # fmt: skip
    if update:
        cmds.insert(
            0,
            {"delete": {"element": {"family": "inet", "table": "egressd_host", "name": "dispatch",
                                    "elem": [iface]}}},
        )  # fmt: skip
    return json.dumps({"nftables": cmds})


def run_baseline(ns: str, n: int, k: int, generation: int, config: Config, tmp: Path) -> float:
    """Seconds for N `ip netns exec NS nft -j -f FILE` (files written beforehand, not timed)."""
    files = []
    for i in range(n):
        path = tmp / f"b{generation}-{i}.json"
        path.write_text(
            baseline_file(
                f"s{i}",
                f"veth{i}",
                policy(i, k, generation),
                config,
                i == 0 and generation == 0,
                generation > 0,
            )
        )
        files.append(path)
    t0 = time.perf_counter()
    for path in files:
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-j", "-f", str(path)], check=True, timeout=CMD_TIMEOUT_S
        )
    return time.perf_counter() - t0


def inner(n: int, k: int) -> dict[str, Any]:
    """Runs inside a throwaway namespace: egressd's HostSide, timed."""
    config = Config()
    backend = LibnftBackend()
    host = HostSide(backend)
    rulesets = [[render(policy(i, k, g), config, host=True) for i in range(n)] for g in (0, 1)]
    out: dict[str, Any] = {}
    for label, gen in (("cold", 0), ("update", 1)):
        t0 = time.perf_counter()
        for i in range(n):
            host.sync(f"s{i}", f"veth{i}", rulesets[gen][i], {})
        out[label] = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.host_list({"table": {"family": "inet", "name": "egressd_host"}})
    out["read"] = time.perf_counter() - t0
    fresh = HostSide(backend)
    t0 = time.perf_counter()
    results = [fresh.sync(f"s{i}", f"veth{i}", rulesets[1][i], {}) for i in range(n)]
    out["restart"] = time.perf_counter() - t0
    out["restart_writes"] = sum(r.writes for r in results)
    backend.close()
    return out


def run_ours(ns: str, n: int, k: int) -> dict[str, float]:
    proc = subprocess.run(
        [
            "ip", "netns", "exec", ns, sys.executable, "-m", "bench.hostside", "--inner",
            "--sandboxes", str(n), "--entries", str(k),
        ],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _netns(name: str, op: str) -> None:
    subprocess.run(["ip", "netns", op, name], check=op == "add", timeout=CMD_TIMEOUT_S, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sandboxes", type=int, default=1000)
    ap.add_argument("--entries", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny and quick: N=20, one repeat")
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
        tmp = Path(tmpdir)
        for rep in range(args.repeats):
            ours_ns, base_ns = f"{tag}o{rep}", f"{tag}b{rep}"
            _netns(ours_ns, "add")
            _netns(base_ns, "add")
            try:
                row: dict[str, float] = {}
                for step in ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours"):
                    if step == "ours":
                        row.update(run_ours(ours_ns, n, k))
                    else:
                        row["base_cold"] = run_baseline(base_ns, n, k, 0, Config(), tmp)
                        row["base_update"] = run_baseline(base_ns, n, k, 1, Config(), tmp)
                runs.append(row)
            finally:
                _netns(ours_ns, "delete")
                _netns(base_ns, "delete")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    result = {
        "sandboxes": n,
        "entries": k,
        "repeats": len(runs),
        "cold_ms_per_sandbox": med("cold") / n * 1000,
        "update_ms_per_sandbox": med("update") / n * 1000,
        "baseline_cold_ms_per_sandbox": med("base_cold") / n * 1000,
        "baseline_update_ms_per_sandbox": med("base_update") / n * 1000,
        "restart_ms": med("restart") * 1000,
        "restart_writes": max(r["restart_writes"] for r in runs),
        "read_ms": med("read") * 1000,
    }
    result["cold_ratio"] = result["baseline_cold_ms_per_sandbox"] / result["cold_ms_per_sandbox"]
    result["update_ratio"] = result["baseline_update_ms_per_sandbox"] / result["update_ms_per_sandbox"]
    print(f"host-side table, N={n} sandboxes, K={k} entries, median of {len(runs)}")
    print(f"{'':24}{'egressd':>12}{'nft -f':>12}{'ratio':>8}")
    for label in ("cold", "update"):
        ours_ms, base_ms = result[f"{label}_ms_per_sandbox"], result[f"baseline_{label}_ms_per_sandbox"]
        print(f"{label + ' ms/sandbox':24}{ours_ms:12.2f}{base_ms:12.2f}{base_ms / ours_ms:7.1f}x")
    print(f"{'restart adopt, all':24}{result['restart_ms']:10.0f} ms   writes {result['restart_writes']}")
    print(f"{'read whole table':24}{result['read_ms']:10.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
