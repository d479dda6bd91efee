"""Apply benchmark: egressd's cached libnftables contexts against `ip netns exec NS nft -j -f FILE`.

Both methods put the same transaction (`replace_table` of the same rendered ruleset) into the same throwaway
namespaces in one run, and which of them goes first alternates per repeat, so machine noise lands on both.
Rendering is timed on its own because both methods pay for it. Run as root from the project root:
`python -m bench.apply` (see bench/README.md for what each figure means).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import ipaddress
import json
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench.figures import Figure
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config
from egressd.model.entries import IPNetwork
from egressd.model.sandbox import Policy, Targets
from egressd.ruleset.exprs import FAMILY, TABLE, Json
from egressd.ruleset.render import FINGERPRINT_CHAIN, Ruleset, render
from egressd.ruleset.transactions import fingerprint_of, replace_table
from egressd.ruleset.variants import neutral_name

NETNS_DIR = Path("/run/netns")
# RFC 2544 benchmarking range and RFC 3849 documentation range: never routed, never anyone's real policy.
V4_POOL = ipaddress.IPv4Network("198.18.0.0/15")
V6_POOL = ipaddress.IPv6Network("2001:db8::/32")
# Every other /32 and every other /64, so no two entries are adjacent and collapse into one element.
V4_SLOTS = V4_POOL.num_addresses // 2
V6_SLOTS = 2 ** (64 - V6_POOL.prefixlen) // 2
MAX_ENTRIES = 2 * V4_SLOTS
ALLOW_SETS = ("allow4", "allow6")

RATIO_GOAL = 15.0
RATIO_GOAL_ENTRIES = 10
LATENCY_GOAL_MS = 100.0
LATENCY_GOAL_ENTRIES = 10_000
CMD_TIMEOUT_S = 60.0


class Aborted(Exception):
    """The run hit --max-seconds (or was interrupted); what was measured so far is still reported."""


@dataclass(frozen=True)
class Deadline:
    """One bound on the whole run, so a hung command or a slow machine cannot keep namespaces around."""

    end: float

    def check(self, where: str) -> None:
        if time.monotonic() >= self.end:
            raise Aborted(f"--max-seconds exceeded during {where}")

    def timeout(self, where: str) -> float:
        """Seconds a command may take: what is left of the run, at most CMD_TIMEOUT_S."""
        self.check(where)
        return min(CMD_TIMEOUT_S, self.end - time.monotonic())


def run(
    argv: Sequence[str], deadline: Deadline, where: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run argv without a shell, bounded by the deadline; a failure names the command and its stderr.
    `stdin`: text fed to the command (one restore process for a whole rule set, not one per rule)."""
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=deadline.timeout(where),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Aborted(f"{' '.join(argv)} timed out during {where}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc


class Namespaces:
    """Throwaway namespaces eb-<pid>-<i>; only names this object created are ever deleted."""

    def __init__(self) -> None:
        self.prefix = f"eb-{os.getpid()}-"
        self.names: list[str] = []

    def create(self, count: int, deadline: Deadline) -> None:
        for i in range(count):
            name = f"{self.prefix}{i}"
            if (NETNS_DIR / name).exists():
                raise RuntimeError(f"namespace {name} already exists and is not ours; refusing to use it")
            run(["ip", "netns", "add", name], deadline, "namespace setup")
            self.names.append(name)

    def delete(self) -> list[str]:
        """Delete what we created, deadline or not; returns failures rather than raising (runs in finally)."""
        failed: list[str] = []
        for name in reversed(self.names):
            try:
                proc = subprocess.run(
                    ["ip", "netns", "del", name],
                    capture_output=True,
                    text=True,
                    timeout=CMD_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                failed.append(f"{name}: ip netns del timed out")
                continue
            if proc.returncode != 0:
                failed.append(f"{name}: {proc.stderr.strip()}")
        self.names.clear()
        return failed


def entries(index: int, count: int) -> list[IPNetwork]:
    """`count` distinct allow_out entries for sandbox `index`: v4 /32s and v6 /64s in turn, never adjacent.

    Each sandbox gets its own slice of the pools, so no two namespaces carry the same table.
    """
    n4, n6 = (count + 1) // 2, count // 2
    base4 = int(V4_POOL.network_address)
    base6 = int(V6_POOL.network_address)
    out: list[IPNetwork] = []
    for j in range(count):
        if j % 2 == 0:
            slot = (index * n4 + j // 2) % V4_SLOTS
            out.append(ipaddress.IPv4Network((base4 + 2 * slot, 32)))
        else:
            slot = (index * n6 + j // 2) % V6_SLOTS
            out.append(ipaddress.IPv6Network((base6 + ((2 * slot) << 64), 64)))
    return out


def make_policy(index: int, count: int) -> Policy:
    """A policy whose allow_out really holds `count` elements after collapsing (checked, not assumed)."""
    targets = Targets.from_entries(entries(index, count))
    got = len(targets.nets4) + len(targets.nets6)
    if got != count:
        raise RuntimeError(f"generated {count} entries but they collapse to {got}")
    return Policy(allow_internet_access=False, allow_out=targets)


def set_elements(listing: list[Json]) -> int:
    """How many elements the allow sets hold in a listing of the table."""
    total = 0
    for item in listing:
        s = item.get("set")
        if s and neutral_name(s.get("name", "")) in ALLOW_SETS:
            total += len(s.get("elem", []))
    return total


def cli_fingerprint(name: str, deadline: Deadline) -> str | None:
    """The fingerprint as the nft CLI sees it inside the namespace: independent of egressd's own contexts."""
    proc = run(
        ["ip", "netns", "exec", name, "nft", "-j", "list", "chain", FAMILY, TABLE, FINGERPRINT_CHAIN],
        deadline,
        "verification",
    )
    return fingerprint_of(json.loads(proc.stdout)["nftables"])


def baseline_apply(name: str, ruleset: Ruleset, file: Path, deadline: Deadline) -> tuple[int, int]:
    """What an operator would do without egressd; returns (write ns, nft process ns)."""
    t0 = time.perf_counter_ns()
    with file.open("w", encoding="utf-8") as fh:
        json.dump(replace_table(ruleset), fh)
    t1 = time.perf_counter_ns()
    run(["ip", "netns", "exec", name, "nft", "-j", "-f", str(file)], deadline, "baseline apply")
    return t1 - t0, time.perf_counter_ns() - t1


@dataclass
class SizeRun:
    """Samples for one size: phase -> one list per repeat -> nanoseconds per namespace."""

    namespaces: int
    entries: int
    samples: dict[str, list[list[int]]] = field(default_factory=dict)
    verified: bool = False

    @property
    def label(self) -> str:
        return f"N={self.namespaces} K={self.entries}"

    def add(self, phase: str, values: list[int]) -> None:
        self.samples.setdefault(phase, []).append(values)

    def per_repeat_ms(self, phase: str) -> list[float]:
        """Mean milliseconds per namespace, one figure per repeat."""
        return [sum(rep) / len(rep) / 1e6 for rep in self.samples.get(phase, []) if rep]


@dataclass(frozen=True)
class Target:
    """One namespace as both methods see it."""

    name: str
    path: str
    policy: Policy
    ruleset: Ruleset
    file: Path


def verify(targets: Sequence[Target], expect: int, deadline: Deadline) -> None:
    """Once per size, from an empty namespace each time: both methods leave the right table, all K elements.

    The CLI check matters: it proves egressd's context wrote into the sandbox namespace, not somewhere else.
    """
    backend = LibnftBackend()
    try:
        for t in targets:
            for method in ("baseline", "egressd"):
                deadline.check("verification")
                backend.remove(t.path)
                if backend.fingerprint(t.path) is not None:
                    raise RuntimeError(f"{t.name}: table still there after remove")
                if method == "baseline":
                    baseline_apply(t.name, t.ruleset, t.file, deadline)
                else:
                    backend.apply(t.path, t.ruleset)
                seen = {"egressd": backend.fingerprint(t.path), "nft CLI": cli_fingerprint(t.name, deadline)}
                for who, fp in seen.items():
                    if fp != t.ruleset.fingerprint:
                        raise RuntimeError(f"{t.name} after {method} apply: {who} reads fingerprint {fp!r}")
                listing = backend.read(t.path) or []
                if (n := set_elements(listing)) != expect:
                    raise RuntimeError(f"{t.name} after {method} apply: {n} set elements, expected {expect}")
    finally:
        backend.close()


def time_each(targets: Sequence[Target], fn: Callable[[Target], object], deadline: Deadline) -> list[int]:
    """Nanoseconds of fn for each target, checking the deadline between (not inside) timings."""
    out: list[int] = []
    for t in targets:
        deadline.check("timing")
        t0 = time.perf_counter_ns()
        fn(t)
        out.append(time.perf_counter_ns() - t0)
    return out


def phase_render(run_: SizeRun, targets: Sequence[Target], config: Config, deadline: Deadline) -> None:
    """Render and serialisation on their own: both methods pay them, so they are kept out of apply."""
    made: list[Ruleset] = []
    run_.add("render", time_each(targets, lambda t: made.append(render(t.policy, config)), deadline))
    if [r.fingerprint for r in made] != [t.ruleset.fingerprint for t in targets]:
        raise RuntimeError("render is not deterministic: fingerprints differ between renders")
    run_.add("serialise", time_each(targets, lambda t: json.dumps(replace_table(t.ruleset)), deadline))


def phase_egressd(
    run_: SizeRun, targets: Sequence[Target], deadline: Deadline, prefix: str = "egressd", raw: bool = True
) -> None:
    """Cold: a fresh backend, so each apply also makes the namespace's context. Warm: the cached one.
    raw=False (prefix libnft): every write through libnftables, as before issue 19."""
    backend = LibnftBackend(raw=raw)
    try:
        gc.collect()
        run_.add(f"{prefix}_cold", time_each(targets, lambda t: backend.apply(t.path, t.ruleset), deadline))
        gc.collect()
        run_.add(f"{prefix}_warm", time_each(targets, lambda t: backend.apply(t.path, t.ruleset), deadline))
        for t in targets:
            if backend.fingerprint(t.path) != t.ruleset.fingerprint:
                raise RuntimeError(f"{t.name}: wrong fingerprint after a timed egressd apply")
    finally:
        backend.close()


def phase_new(
    run_: SizeRun, targets: Sequence[Target], deadline: Deadline, prefix: str, raw: bool | None
) -> None:
    """A new sandbox on a running agent (--compare-writes): its namespace holds no table (deleted, untimed)
    and is new to the backend, which does what the agent does: a read that finds nothing, then the table
    in one transaction. raw=None: the baseline, `nft -j -f` into the empty namespace."""
    backend = LibnftBackend(raw=bool(raw))
    out: list[int] = []
    try:
        gc.collect()
        for t in targets:
            deadline.check("new sandboxes")
            backend.remove(t.path)
            backend.forget(t.path)
            t0 = time.perf_counter_ns()
            if raw is None:
                baseline_apply(t.name, t.ruleset, t.file, deadline)
            else:
                listing = backend.read(t.path)
                backend.apply(t.path, t.ruleset, None, listing if listing is not None else [])
            out.append(time.perf_counter_ns() - t0)
            if backend.fingerprint(t.path) != t.ruleset.fingerprint:
                raise RuntimeError(f"{t.name}: wrong fingerprint after a new sandbox's apply ({prefix})")
    finally:
        backend.close()
    run_.add(f"{prefix}_new", out)


def phase_baseline(run_: SizeRun, targets: Sequence[Target], empty: Path, deadline: Deadline) -> None:
    """The operator's way, split into writing the file and the nft process, plus the process floor."""
    gc.collect()
    write: list[int] = []
    exec_: list[int] = []
    for t in targets:
        deadline.check("baseline")
        w, e = baseline_apply(t.name, t.ruleset, t.file, deadline)
        write.append(w)
        exec_.append(e)
    run_.add("baseline", [w + e for w, e in zip(write, exec_, strict=True)])
    run_.add("baseline_write", write)
    run_.add("baseline_exec", exec_)
    # The same process chain with nothing to do: what the baseline pays before the first rule.
    run_.add(
        "spawn_floor",
        time_each(
            targets,
            lambda t: run(["ip", "netns", "exec", t.name, "nft", "-j", "-f", str(empty)], deadline, "floor"),
            deadline,
        ),
    )


def bench_size(
    run_: SizeRun,
    names: Sequence[str],
    tmp: Path,
    repeats: int,
    config: Config,
    deadline: Deadline,
    compare: bool = False,
) -> None:
    """Render once for setup, verify, then R repeats with the egressd/baseline order flipped each time.
    compare (--compare-writes): egressd with libnftables writes too, and new sandboxes every way."""
    targets = []
    for i, name in enumerate(names[: run_.namespaces]):
        policy = make_policy(i, run_.entries)
        targets.append(
            Target(name, str(NETNS_DIR / name), policy, render(policy, config), tmp / f"{name}.json")
        )
    empty = tmp / "empty.json"
    empty.write_text('{"nftables": []}\n', encoding="utf-8")
    # Verification leaves every namespace with the table in place, so every timed apply below does the same
    # kernel work whichever method runs it: delete a K-element table, build an identical one.
    verify(targets, run_.entries, deadline)
    run_.verified = True
    phases: list[Callable[[], None]] = [
        lambda: phase_egressd(run_, targets, deadline),
        lambda: phase_baseline(run_, targets, empty, deadline),
    ]
    if compare:
        phases[1:1] = [
            lambda: phase_egressd(run_, targets, deadline, "libnft", raw=False),
            lambda: phase_new(run_, targets, deadline, "egressd", True),
            lambda: phase_new(run_, targets, deadline, "libnft", False),
            lambda: phase_new(run_, targets, deadline, "baseline", None),
        ]
    for r in range(repeats):
        phase_render(run_, targets, config, deadline)
        for phase in phases if r % 2 == 0 else phases[::-1]:
            phase()


def profile_warm(name: str, entries_: int, config: Config, repeats: int) -> str:
    """cProfile of render + warm apply in one namespace; libnftables time is the tottime of Nftables.cmd."""
    path = str(NETNS_DIR / name)
    policy = make_policy(0, entries_)
    backend = LibnftBackend()
    prof = cProfile.Profile()
    try:
        backend.apply(path, render(policy, config))  # makes the context, outside the profile
        prof.enable()
        for _ in range(repeats):
            backend.apply(path, render(policy, config))
        prof.disable()
    finally:
        backend.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


# --- reporting -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table; `primary` is False for goals shown for information, in parentheses."""

    figure: str
    egressd: float | None
    baseline: float | None
    ratio: bool = False
    goal: str = ""
    met: bool | None = None
    primary: bool = True


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _sum(*series: list[float]) -> list[float]:
    return [sum(v) for v in zip(*series, strict=False)] if all(series) else []


def _diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=False)]


def rows_for(run_: SizeRun) -> list[Row]:
    """The table rows of one size; goals are attached where the project states them."""
    ms = {phase: run_.per_repeat_ms(phase) for phase in run_.samples}
    med = {phase: _median(values) for phase, values in ms.items()}
    cold, warm, base = med.get("egressd_cold"), med.get("egressd_warm"), med.get("baseline")
    render_ms = ms.get("render", [])
    e2e_e = _median(_sum(render_ms, ms.get("egressd_warm", [])))
    e2e_b = _median(_sum(render_ms, ms.get("baseline", [])))
    k = run_.entries

    def ratio_goal(e: float | None) -> tuple[str, bool | None]:
        if k != RATIO_GOAL_ENTRIES or e is None or base is None:
            return "", None
        return f">={RATIO_GOAL:g}x", base / e >= RATIO_GOAL

    def latency_goal(e: float | None) -> tuple[str, bool | None]:
        if k < LATENCY_GOAL_ENTRIES or e is None:
            return "", None
        return f"<{LATENCY_GOAL_MS:g} ms", e < LATENCY_GOAL_MS

    rows: list[Row] = []

    def per_entry(v: float | None) -> float | None:
        return None if v is None else v * 1000 / k

    g_cold = ratio_goal(cold) if k == RATIO_GOAL_ENTRIES else latency_goal(cold)
    g_warm = ratio_goal(warm) if k == RATIO_GOAL_ENTRIES else latency_goal(warm)
    rows.append(Row("apply, first (cold) ms/ns", cold, base, True, *g_cold, primary=False))
    rows.append(Row("apply, re-apply (warm) ms/ns", warm, base, True, *g_warm))
    rows.append(Row("apply warm us/entry", per_entry(warm), per_entry(base), True))
    rows.append(Row("render ms/ns (both pay it)", med.get("render"), med.get("render")))
    rows.append(Row("render + apply warm ms/ns", e2e_e, e2e_b, True, *latency_goal(e2e_e), primary=False))
    rows.append(
        Row("  JSON serialise ms/ns (dumps | dump+write)", med.get("serialise"), med.get("baseline_write"))
    )
    rest = _median(_diff(ms.get("egressd_warm", []), ms.get("serialise", [])))
    rows.append(
        Row("  apply minus serialise ms/ns (libnft | nft proc)", rest, med.get("baseline_exec"), True)
    )
    rows.append(Row("  process floor ms/ns (nft -j -f empty)", None, med.get("spawn_floor")))
    if "libnft_warm" in med:  # --compare-writes: the same backend writing through libnftables
        base_new = med.get("baseline_new")
        rows.append(Row("apply, first (cold), libnftables writes ms/ns", med.get("libnft_cold"), base, True))
        rows.append(
            Row("apply, re-apply (warm), libnftables writes ms/ns", med.get("libnft_warm"), base, True)
        )
        rows.append(Row("new sandbox (read + table) ms/ns", med.get("egressd_new"), base_new, True))
        rows.append(Row("new sandbox, libnftables writes ms/ns", med.get("libnft_new"), base_new, True))
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    for limit, spec in ((100, ".0f"), (10, ".1f"), (1, ".2f")):
        if abs(v) >= limit:
            return format(v, spec)
    return format(v, ".3f")


def table(runs: Sequence[SizeRun]) -> str:
    """Plain text, one block per size, so a terminal or a CI log shows the result as it is."""
    head = f"{'figure':<62} {'egressd':>9} {'baseline':>9} {'ratio':>7}  {'goal':<10} met?"
    lines = [head, "-" * len(head)]
    for run_ in runs:
        for row in rows_for(run_):
            ratio = ""
            if row.ratio and row.egressd and row.baseline is not None:
                ratio = f"{row.baseline / row.egressd:.1f}x"
            goal, met = row.goal, "" if row.met is None else ("yes" if row.met else "NO")
            if goal and not row.primary:
                goal, met = f"({goal})", f"({met.lower()})"
            lines.append(
                f"{run_.label + '  ' + row.figure:<62} {_fmt(row.egressd):>9} {_fmt(row.baseline):>9} "
                f"{ratio:>7}  {goal:<10} {met}".rstrip()
            )
        lines.append("")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Enough to tell two result files apart: figures mean nothing without the machine they came from."""
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, timeout=10, check=False)
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = "unknown"
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "nft": nft.stdout.strip(),
        "python": sys.version.split()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def to_json(runs: Sequence[SizeRun]) -> list[dict[str, Any]]:
    """Every figure plus each repeat's value, so results from two runs or machines can be compared."""
    out = []
    for run_ in runs:
        phases = {}
        for phase in run_.samples:
            per_rep = run_.per_repeat_ms(phase)
            phases[phase] = {
                "median_ms_per_ns": _median(per_rep),
                "min_ms_per_ns": min(per_rep) if per_rep else None,
                "max_ms_per_ns": max(per_rep) if per_rep else None,
                "median_us_per_entry": (m * 1000 / run_.entries) if (m := _median(per_rep)) else None,
                "per_repeat_ms_per_ns": per_rep,
            }
        rows = [
            {
                "figure": row.figure.strip(),
                "egressd": row.egressd,
                "baseline": row.baseline,
                "ratio": (row.baseline / row.egressd) if row.ratio and row.egressd and row.baseline else None,
                "goal": row.goal or None,
                "met": row.met,
                "primary_goal": row.primary if row.goal else None,
            }
            for row in rows_for(run_)
        ]
        out.append(
            {
                "namespaces": run_.namespaces,
                "entries": run_.entries,
                "verified": run_.verified,
                "repeats_done": len(run_.samples.get("egressd_warm", [])),
                "phases": phases,
                "table": rows,
            }
        )
    return out


BASELINE_NAME = "ip netns exec NS nft -j -f FILE, per namespace"


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: the warm apply of every size, against the
    baseline of the same run, with the goals `rows_for` attaches (ratio at K=10, latency at K>=10,000)."""
    figures: list[Figure] = []
    for size in results.get("sizes", []):
        n, k = size["namespaces"], size["entries"]
        phases = size.get("phases", {})
        warm = phases.get("egressd_warm", {}).get("median_ms_per_ns")
        base = phases.get("baseline", {}).get("median_ms_per_ns")
        goal: str | None = None
        met: bool | None = None
        if k == RATIO_GOAL_ENTRIES:
            goal = f">= {RATIO_GOAL:g}x"
            met = None if not warm or base is None else base / warm >= RATIO_GOAL
        elif k >= LATENCY_GOAL_ENTRIES:
            goal = f"< {LATENCY_GOAL_MS:g} ms"
            met = None if warm is None else warm < LATENCY_GOAL_MS
        reps = size.get("repeats_done", 0)
        figures.append(
            Figure(
                bench="apply",
                name=f"apply (warm), N={n} K={k:,}, ms per namespace",
                unit="ms",
                egressd=warm,
                baseline=base,
                baseline_name=BASELINE_NAME,
                goal=goal,
                met=met,
                note=f"median of {reps} repeats" + ("" if size.get("verified") else "; NOT verified"),
            )
        )
    return figures


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.apply", description=__doc__.splitlines()[0])
    p.add_argument("--namespaces", type=int, default=50, metavar="N", help="sandboxes per size (default 50)")
    p.add_argument("--entries", type=int, nargs="+", default=[10, 1000], metavar="K", help="default 10 1000")
    p.add_argument(
        "--single", type=int, default=10_000, metavar="K", help="entries of the one-sandbox run (0: skip)"
    )
    p.add_argument("--repeats", type=int, default=5, metavar="R", help="medians over R repeats (default 5)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="abort cleanly after this (default 300)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write all figures and machine info here")
    p.add_argument("--profile", action="store_true", help="cProfile render + warm apply at the largest K")
    p.add_argument("--smoke", action="store_true", help="N=2, K=10, R=1, single K=500: a few seconds")
    p.add_argument(
        "--compare-writes",
        action="store_true",
        help="also egressd writing through libnftables (as before issue 19), and new sandboxes every way",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.namespaces, args.entries, args.repeats, args.single = 2, [10], 1, 500
    if args.namespaces < 1 or args.repeats < 1 or args.max_seconds <= 0:
        p.error("--namespaces, --repeats and --max-seconds must be positive")
    if not all(1 <= k <= MAX_ENTRIES for k in args.entries) or not 0 <= args.single <= MAX_ENTRIES:
        p.error(f"entries must be 1..{MAX_ENTRIES} so they stay distinct (--single 0 skips that run)")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like an interrupt, so the finally block still deletes the namespaces."""
    raise KeyboardInterrupt(f"signal {signum}")


def began(name: str) -> bool:
    """What every benchmark does first: it runs only as root (it creates network namespaces), and SIGTERM
    unwinds it like an interrupt, so its namespaces are still deleted. False, said on stderr: not root."""
    if os.geteuid() != 0:
        print(f"bench.{name}: needs root (it creates network namespaces)", file=sys.stderr)
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the run completed (goals are reported, not enforced); 2 when it could not run or was aborted."""
    args = parse_args(argv)
    if not began("apply"):
        return 2
    started = time.monotonic()
    deadline = Deadline(started + args.max_seconds)
    sizes = [(args.namespaces, k) for k in args.entries]
    if args.single:
        sizes.append((1, args.single))
    runs: list[SizeRun] = []
    profile = ""
    aborted: str | None = None
    config = Config()
    info = machine_info()
    namespaces = Namespaces()
    try:
        with tempfile.TemporaryDirectory(prefix="egressd-bench-") as tmp:
            namespaces.create(max(n for n, _ in sizes), deadline)
            for n, k in sizes:
                runs.append(SizeRun(n, k))
                bench_size(
                    runs[-1], namespaces.names, Path(tmp), args.repeats, config, deadline, args.compare_writes
                )
            if args.profile:
                biggest = max(k for _, k in sizes)
                profile = profile_warm(namespaces.names[0], biggest, config, max(args.repeats, 5))
    except Aborted as e:
        aborted = str(e)
    except KeyboardInterrupt as e:
        aborted = f"interrupted ({e or 'SIGINT'})"
    finally:
        failed = namespaces.delete()
        for line in failed:
            print(f"bench.apply: could not delete namespace {line}", file=sys.stderr)
    wall = time.monotonic() - started

    print(
        f"egressd apply benchmark: median over {args.repeats} repeats of mean ms per namespace; "
        f"ratio = baseline / egressd"
    )
    print(
        f"egressd = LibnftBackend.apply; baseline = json.dump to a file + `ip netns exec NS nft -j -f FILE`; "
        f"{info['nproc']} CPUs, kernel {info['kernel']}, {info['nft']}, Python {info['python']}"
    )
    print()
    print(table(runs))
    if profile:
        print(f"cProfile, render + warm apply, K={max(k for _, k in sizes)} (sorted by own time):")
        print(profile)
    status = f"ABORTED: {aborted}" if aborted else "complete"
    print(f"wall time {wall:.1f} s ({status}); all sizes verified: {all(r.verified for r in runs)}")
    if args.json:
        doc = {
            "machine": info,
            "settings": {
                "namespaces": args.namespaces,
                "entries": args.entries,
                "single": args.single,
                "repeats": args.repeats,
                "max_seconds": args.max_seconds,
                "smoke": args.smoke,
                "compare_writes": args.compare_writes,
            },
            "goals": {
                "ratio_at_k10": RATIO_GOAL,
                "latency_ms_at_k10000": LATENCY_GOAL_MS,
            },
            "wall_seconds": wall,
            "aborted": aborted,
            "sizes": to_json(runs),
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 2 if aborted else 0


if __name__ == "__main__":
    sys.exit(main())
