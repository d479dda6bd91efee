"""The benchmark suite: every bench module in turn, one table, one results file.

`python -m bench` (or `make bench`) runs bench.apply, bench.agent, bench.dns, bench.tamper, bench.hostside,
bench.hostside_agent, bench.onboard, bench.denials, bench.fleet, bench.natsscale, bench.intercept,
bench.intercept_scale and bench.datapath (when it exists) one after another, each as its own process with
`--json`, each bounded in time, then reads every result, asks the module's `summary()` for its headline
figures (egressd against the baseline measured in the same run) and prints them as one table.
Everything goes to bench/results.json. Run as root from the project root; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.figures import Figure

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results.json"
GRACE_S = 45.0  # beyond a module's --max-seconds: its own clean-up (deleting namespaces) after it aborts
INT_WAIT_S = 30.0  # after SIGINT (the module's finally blocks run), before its process group is killed
SMOKE_SECONDS = 180.0  # bound of each bench in a smoke run
HELP_TIMEOUT_S = 60.0
STDERR_TAIL_LINES = 20


@dataclass(frozen=True)
class Bench:
    """One module of the suite and the sizes of its full run (the issue's figures), bounded by `seconds`."""

    name: str
    args: tuple[str, ...]
    seconds: float
    optional: bool = False  # skipped, not failed, when its file does not exist


# Sum of the bounds: 4,200 s, so a full run ends within about 70 minutes even if every bench hits its bound
# (plus the modules' own clean-up after an abort). A typical full run is much shorter.
BENCHES: tuple[Bench, ...] = (
    Bench("apply", ("--namespaces", "50", "--entries", "10", "1000", "--single", "10000"), 240.0),
    Bench("agent", ("--sandboxes", "1000", "--storm-events", "1000"), 600.0),
    Bench("dns", ("--sandboxes", "1000", "--shared", "100", "--distinct", "10000"), 360.0),
    Bench("tamper", ("--sandboxes", "200", "--tampers", "50"), 300.0),
    # N=200 rather than the module's default 1,000: host-side writes grow with N per sandbox (see
    # docs/performance.md), so N=1,000 x 3 repeats would take far longer than the suite's budget.
    Bench("hostside", ("--sandboxes", "200"), 480.0),
    Bench("hostside_agent", ("--sandboxes", "1000"), 300.0),  # about 95 s
    Bench("onboard", ("--existing", "1000", "--burst", "300"), 180.0),  # about 50 s
    Bench("denials", ("--sandboxes", "200", "--seconds", "10"), 180.0),  # about 140 s, mostly fixed floods
    Bench("fleet", ("--updates", "200", "--sandboxes", "1000"), 180.0),  # about 65 s
    # H=300, not 1,000: a fleet start of 1,000 hosts x 100 keys takes about 80 s on nats-server 2.9.10 and the
    # whole module about 270 s (docs/fleet.md); 300 shows the same growth in about 35 s.
    Bench("natsscale", ("--hosts", "300"), 240.0),
    Bench("intercept", (), 120.0),  # 500 queries per answer size and way, three ways: about 25 s
    Bench("intercept_scale", ("--sandboxes", "1000"), 420.0),  # about 180 s
    Bench("datapath", (), 600.0, optional=True),  # its own defaults: K=10,000, R=5 (about 480 s)
)
NAMES = tuple(b.name for b in BENCHES)


@dataclass
class Outcome:
    """What one bench left behind: its exit status, time, JSON and figures, or why there are none."""

    name: str
    command: list[str] = field(default_factory=list)
    bound_seconds: float | None = None
    exit_status: int | None = None
    wall_seconds: float | None = None
    timed_out: bool = False
    interrupted: bool = False
    skipped: str | None = None
    error: str | None = None
    stdout: str = ""
    stderr_tail: str = ""
    results: dict[str, Any] | None = None
    figures: list[Figure] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.skipped is None and (self.exit_status != 0 or self.error is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "bound_seconds": self.bound_seconds,
            "exit_status": self.exit_status,
            "wall_seconds": self.wall_seconds,
            "timed_out": self.timed_out,
            "interrupted": self.interrupted,
            "skipped": self.skipped,
            "failed": self.failed,
            "error": self.error,
            "stderr_tail": self.stderr_tail,
            "stdout": self.stdout,
            "results": self.results,
            "figures": [f.to_json() for f in self.figures],
        }


# --- running one bench ---------------------------------------------------------------------------------


def module_options(name: str) -> set[str]:
    """Which of the suite's pass-through options the module takes, read from its --help (datapath's are not
    known in advance)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=HELP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return set()
    return {opt for opt in ("--max-seconds", "--repeats", "--smoke") if opt in proc.stdout}


def command_for(bench: Bench, out: Path, smoke: bool, repeats: int | None, options: set[str]) -> list[str]:
    """The module's command line: sizes of the full run (or --smoke), --repeats and --max-seconds if taken."""
    cmd = [sys.executable, "-m", f"bench.{bench.name}", "--json", str(out)]
    if smoke:
        cmd.append("--smoke")
    else:
        cmd.extend(bench.args)
    if repeats is not None and "--repeats" in options:
        cmd.extend(["--repeats", str(repeats)])
    if "--max-seconds" in options:
        cmd.extend(["--max-seconds", f"{bound_for(bench, smoke):g}"])
    return cmd


def bound_for(bench: Bench, smoke: bool) -> float:
    return SMOKE_SECONDS if smoke else bench.seconds


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT first, so the module's finally blocks delete its namespaces; then SIGKILL to its whole group."""
    try:
        os.kill(proc.pid, signal.SIGINT)
        return proc.wait(timeout=INT_WAIT_S)
    except ProcessLookupError:
        return proc.wait()
    except subprocess.TimeoutExpired:
        pass
    finally:
        kill_group(proc.pid)
    return proc.wait()


def kill_group(pgid: int) -> None:
    """Whatever the module left running in its own session (agents, dnsmasq), once the module is done."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_bench(bench: Bench, tmp: Path, smoke: bool, repeats: int | None) -> Outcome:
    """Run one module as a process of its own session, bounded; then load its JSON and its figures."""
    out = tmp / f"{bench.name}.json"
    outcome = Outcome(bench.name)
    if not (BENCH_DIR / f"{bench.name}.py").exists():
        if bench.optional:
            outcome.skipped = f"bench/{bench.name}.py does not exist"
        else:
            outcome.error = f"bench/{bench.name}.py does not exist"
        return outcome
    bound = bound_for(bench, smoke)
    options = module_options(bench.name)
    outcome.command = command_for(bench, out, smoke, repeats, options)
    outcome.bound_seconds = bound + GRACE_S if "--max-seconds" in options else bound
    stdout_path, stderr_path = tmp / f"{bench.name}.stdout", tmp / f"{bench.name}.stderr"
    t0 = time.monotonic()
    with stdout_path.open("wb") as so, stderr_path.open("wb") as se:
        proc = subprocess.Popen(outcome.command, cwd=ROOT, stdout=so, stderr=se, start_new_session=True)
        try:
            outcome.exit_status = proc.wait(timeout=outcome.bound_seconds)
        except subprocess.TimeoutExpired:
            outcome.timed_out = True
            outcome.exit_status = stop(proc)
            outcome.error = f"timed out after {outcome.bound_seconds:g} s"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM of the suite: stop this bench, keep what it wrote
            outcome.interrupted = True
            outcome.exit_status = stop(proc)
            outcome.error = "interrupted"
        else:
            kill_group(proc.pid)  # anything the module left running after it exited
        finally:
            outcome.wall_seconds = time.monotonic() - t0
            outcome.stdout = stdout_path.read_text(encoding="utf-8", errors="replace")
            outcome.stderr_tail = tail(stderr_path.read_text(encoding="utf-8", errors="replace"))
    if outcome.exit_status != 0 and outcome.error is None:
        outcome.error = f"exit status {outcome.exit_status}"
    collect(outcome, out)
    return outcome


def collect(outcome: Outcome, out: Path) -> None:
    """Load the module's JSON (a failed run may still have written one) and ask its summary() for figures."""
    if not out.exists():
        outcome.error = outcome.error or "no JSON written"
        return
    try:
        outcome.results = json.loads(out.read_text(encoding="utf-8"))
        module = importlib.import_module(f"bench.{outcome.name}")
        outcome.figures = list(module.summary(outcome.results))
    except Exception as e:  # noqa: BLE001 - a broken result or summary() is reported, the suite goes on
        problem = f"summary: {type(e).__name__}: {e}"
        outcome.error = f"{outcome.error}; {problem}" if outcome.error else problem


# --- the table ----------------------------------------------------------------------------------------


def fmt_value(value: float | None, unit: str) -> str:
    """About three significant digits, counts as counts, with the unit."""
    if value is None:
        return "-"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        text = f"{int(value):,}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}" if unit else text


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def fmt_met(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def table(figures: Sequence[Figure]) -> str:
    """One plain-text table; baselines are numbered and named below it, so the columns stay narrow."""
    notes: dict[str, int] = {}
    rows = [("bench", "figure", "egressd", "baseline", "ratio", "goal", "met")]
    for f in figures:
        base = fmt_value(f.baseline, f.unit) if f.baseline is not None else ""
        if f.baseline_name:
            base = f"{base} [{notes.setdefault(f.baseline_name, len(notes) + 1)}]".strip()
        rows.append(
            (
                f.bench,
                f.name,
                fmt_value(f.egressd, f.unit),
                base,
                fmt_ratio(f.ratio),
                f.goal or "",
                fmt_met(f.met),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4}

    def line(row: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [line(rows[0]), "-" * len(line(rows[0]))]
    out.extend(line(r) for r in rows[1:])
    if notes:
        out.append("")
        out.extend(f"[{i}] baseline: {name}" for name, i in notes.items())
    return "\n".join(out)


# --- the suite ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--only", nargs="+", choices=NAMES, metavar="NAME", help=f"run only these ({', '.join(NAMES)})"
    )
    p.add_argument("--skip", nargs="+", choices=NAMES, metavar="NAME", default=[], help="leave these out")
    p.add_argument("--smoke", action="store_true", help="every module with --smoke: tiny N, a few minutes")
    p.add_argument("--repeats", type=int, metavar="R", help="passed to the modules that take --repeats")
    p.add_argument("--json", type=Path, default=DEFAULT_OUT, metavar="OUT", help="default bench/results.json")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def selected(args: argparse.Namespace) -> list[Bench]:
    wanted = set(args.only or NAMES) - set(args.skip)
    return [b for b in BENCHES if b.name in wanted]


def document(
    args: argparse.Namespace,
    machine: dict[str, Any],
    outcomes: Sequence[Outcome],
    wall: float,
    note: str | None,
) -> dict[str, Any]:
    return {
        "machine": machine,
        "settings": {
            "smoke": args.smoke,
            "repeats": args.repeats,
            "only": args.only,
            "skip": args.skip,
            "benches": [b.name for b in selected(args)],
        },
        "wall_seconds": wall,
        "interrupted": note,
        "failed": [o.name for o in outcomes if o.failed],
        "figures": [f.to_json() for o in outcomes for f in o.figures],
        "benches": {o.name: o.to_json() for o in outcomes},
    }


def write(path: Path, doc: dict[str, Any]) -> None:
    """Whole or not at all, after every bench: an interrupted suite still leaves what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the running bench is stopped and its namespaces deleted."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """0 when every bench ran and wrote its figures (goals are reported, not enforced); 1 when one failed;
    2 when the suite could not run or was interrupted."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (the benchmarks create network namespaces)", file=sys.stderr)
        return 2
    from bench.apply import machine_info  # imports egressd: after the root check, so --help works anywhere

    signal.signal(signal.SIGTERM, _terminate)
    benches = selected(args)
    machine = machine_info()
    started = time.monotonic()
    outcomes: list[Outcome] = []
    interrupted: str | None = None
    with tempfile.TemporaryDirectory(prefix="egressd-bench-suite-") as tmp:
        for i, bench in enumerate(benches, 1):
            print(f"[{i}/{len(benches)}] bench.{bench.name} ...", file=sys.stderr, flush=True)
            try:
                outcome = run_bench(bench, Path(tmp), args.smoke, args.repeats)
            except KeyboardInterrupt:  # outside the bench's own run (its --help, its summary)
                outcome = Outcome(bench.name, error="interrupted", interrupted=True)
            outcomes.append(outcome)
            if outcome.interrupted:
                interrupted = f"interrupted during bench.{bench.name}"
                break
            status = outcome.skipped or outcome.error or "ok"
            print(
                f"[{i}/{len(benches)}] bench.{bench.name}: {status} ({outcome.wall_seconds or 0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            write(args.json, document(args, machine, outcomes, time.monotonic() - started, None))
    wall = time.monotonic() - started
    write(args.json, document(args, machine, outcomes, wall, interrupted))

    kind = (
        "SMOKE run (tiny sizes: goals are shown, but mean nothing at this scale)"
        if args.smoke
        else "full run"
    )
    print(
        f"egressd benchmark suite, {kind}: egressd and its baseline measured in the same run, medians "
        f"over repeats; ratio = baseline / egressd for costs, egressd / baseline for rates and DNS queries"
    )
    print(
        f"{machine['nproc']} CPUs, kernel {machine['kernel']}, {machine['nft']}, Python {machine['python']}"
    )
    print()
    print(table([f for o in outcomes for f in o.figures]))
    print()
    for o in outcomes:
        if o.skipped:
            print(f"skipped bench.{o.name}: {o.skipped}")
        elif o.failed:
            print(f"FAILED bench.{o.name}: {o.error} (exit status {o.exit_status})")
            if o.stderr_tail:
                print("  " + o.stderr_tail.replace("\n", "\n  "))
    met = [f.met for o in outcomes for f in o.figures if f.met is not None]
    print(
        f"wall time {wall:.1f} s; goals met {sum(met)}/{len(met)}; "
        f"benches failed {sum(o.failed for o in outcomes)}/{len(outcomes)}"
        + (f"; {interrupted}" if interrupted else "")
        + f"; results in {args.json}"
    )
    if interrupted:
        return 2
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
