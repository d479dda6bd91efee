"""What this host's libnftables can and cannot do, for the three limits egressd was built around on
libnftables 1.0.6 (Debian 12): `python -m bench.libnft_limits` (root), run on each release to compare.

1. threads: several contexts, one per thread, listing a table with sets at once, without egressd's lock;
2. descriptors: a context whose netlink socket is at descriptor 1024 or above;
3. the cache: the cost of one small table's transaction as other tables multiply in the namespace (what a
   host-side change pays, since every host-side table lives in the agent's namespace).

Each probe runs in a child process inside a throwaway network namespace, so an abort is an answer, not a
crash, and nothing touches the host's own ruleset. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

THREADS, THREAD_SECONDS, THREAD_RUNS = 8, 3.0, 10
TABLE_COUNTS = (0, 50, 200, 500)
REPEATS = 30


def _nft() -> Any:
    import nftables  # Debian's python3-nftables

    n = nftables.Nftables()
    n.set_json_output(True)
    return n


def _cmd(n: Any, cmds: list[dict[str, Any]]) -> None:
    rc, _out, err = n.json_cmd({"nftables": cmds})
    if rc != 0:
        raise RuntimeError(err)


def _table(name: str, sets: int = 0, elements: int = 0) -> list[dict[str, Any]]:
    """One table like a host-side one: a chain, a few rules, optional interval sets with elements."""
    t = {"family": "inet", "table": name}
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": "inet", "name": name}}},
        {
            "add": {
                "chain": {**t, "name": "c", "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}
            }
        },
    ]
    for i in range(sets):
        cmds.append({"add": {"set": {**t, "name": f"s{i}", "type": "ipv4_addr", "flags": ["interval"]}}})
        elem = [f"10.{i}.{j // 250}.{j % 250}" for j in range(elements)]
        if elem:
            cmds.append({"add": {"element": {**t, "name": f"s{i}", "elem": elem}}})
        # a concatenated type: printing it splits the type's name with strtok(), which 1.0.6 does unsafely
        cmds.append({"add": {"set": {**t, "name": f"c{i}", "type": ["ipv4_addr", "inet_service"]}}})
    for port in (22, 80, 443):
        match = {
            "match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": port}
        }
        cmds.append({"add": {"rule": {**t, "chain": "c", "expr": [match, {"accept": None}]}}})
    return cmds


def child_threads(args: argparse.Namespace) -> None:
    _cmd(_nft(), _table("probe", sets=20, elements=100))
    deadline = time.monotonic() + args.seconds

    def lister() -> None:
        n = _nft()
        while time.monotonic() < deadline:
            n.json_cmd({"nftables": [{"list": {"table": {"family": "inet", "name": "probe"}}}]})

    threads = [threading.Thread(target=lister) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def child_descriptors(args: argparse.Namespace) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    held = [os.dup(null) for _ in range(1100)]  # the next descriptors are above 1024
    n = _nft()
    assert max(held) > 1024
    for _ in range(20):
        _cmd(n, _table("probe"))
        _cmd(n, [{"delete": {"table": {"family": "inet", "name": "probe"}}}])


def child_cache(args: argparse.Namespace) -> None:
    """The median time of one table's replace (add, delete, add again with its contents) per table count."""
    n = _nft()
    out = {}
    made = 0
    for count in args.tables:
        batch: list[dict[str, Any]] = []
        for i in range(made, count):
            batch += _table(f"other{i}", sets=2, elements=10)
        if batch:
            _cmd(n, batch)
        made = count
        times = []
        for _ in range(REPEATS):
            cmds = [{"add": {"table": {"family": "inet", "name": "one"}}}]
            cmds += [{"delete": {"table": {"family": "inet", "name": "one"}}}, *_table("one")]
            t0 = time.perf_counter()
            _cmd(n, cmds)
            times.append(time.perf_counter() - t0)
        out[str(count)] = round(statistics.median(times) * 1000, 2)
    print(json.dumps(out))


CHILDREN = {"threads": child_threads, "descriptors": child_descriptors, "cache": child_cache}


def in_namespace(
    probe: str, args: argparse.Namespace, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    ns = f"egressd-probe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.libnft_limits", "--child", probe]
        argv += ["--seconds", str(args.seconds), "--tables", ",".join(map(str, args.tables))]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def outcome(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode == 0:
        return "ok"
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}"
    return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"


def version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "libnftables1"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=THREAD_RUNS, help="runs of the thread probe")
    p.add_argument("--seconds", type=float, default=THREAD_SECONDS, help="length of one thread run")
    p.add_argument("--tables", type=lambda s: [int(n) for n in s.split(",")], default=list(TABLE_COUNTS))
    args = p.parse_args()
    if args.child:
        CHILDREN[args.child](args)
        return 0
    threads = [outcome(in_namespace("threads", args)) for _ in range(args.runs)]
    cache = in_namespace("cache", args)
    result = {
        "libnftables1": version(),
        "threads": {"threads": THREADS, "seconds": args.seconds, "runs": threads},
        "descriptors_above_1024": outcome(in_namespace("descriptors", args)),
        "one_table_replace_ms_by_other_tables": json.loads(cache.stdout)
        if cache.returncode == 0
        else outcome(cache),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
