"""bench.denials' record of one run, and what is made of the runs: medians per mode, the printed report.

A run is one agent (logging denials or not) in one repeat: idle, a flood for its CPU, a flood while `status`
is asked. Everything here reads numbers already measured; bench/denials.py measures them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.agent import percentile
from bench.denials_flood import STATUS_EVERY_S
from egressd.model.config import Config


@dataclass
class Run:
    """One agent (one mode) in one repeat: idle, the flood for CPU, then the flood for `status`. CPU in s."""

    mode: str
    repeat: int
    start_s: float | None = None  # spawn to every sandbox enforced
    idle_s: float | None = None
    idle_cpu_s: float | None = None
    flood: dict[str, Any] = field(default_factory=dict)  # the sender's answer
    flood_cpu_s: float | None = None
    tail_cpu_s: float | None = None  # the TAIL_S after the flood
    denials: dict[str, Any] | None = None  # agent.denials, what the flood added (log mode)
    monitor: dict[str, int] = field(default_factory=dict)  # the change monitor's counters, the flood's
    status_flood: dict[str, Any] = field(default_factory=dict)  # the second flood, while status is asked
    status_denials: dict[str, Any] | None = None
    status_ms: list[float] = field(default_factory=list)
    status_errors: int = 0
    rss_kib: int | None = None
    log_bytes: int | None = None  # the agent's log after both floods (one `denied` line per event)
    verified: bool = False

    @property
    def flood_cores(self) -> float | None:
        s = self.flood.get("seconds")
        return self.flood_cpu_s / s if self.flood_cpu_s is not None and s else None

    @property
    def idle_cores(self) -> float | None:
        return self.idle_cpu_s / self.idle_s if self.idle_cpu_s is not None and self.idle_s else None


def _med(values: Sequence[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def kernel_logged(den: dict[str, Any] | None) -> int | None:
    """Packets the kernel logged to the agent: made into events, or dropped by it (`nats` drops are events
    not published, already counted in `packets`)."""
    if den is None:
        return None
    return int(den["packets"]) + sum(v for k, v in den["dropped"].items() if k != "nats")


def mode_figures(runs: Sequence[Run], n: int, config: Config) -> dict[str, Any]:
    """Medians over one mode's repeats; status latencies pooled over them."""
    ms = [v for r in runs for v in r.status_ms]
    floods = [r.flood for r in runs if r.flood]
    d = config.denials
    out: dict[str, Any] = {
        "repeats": len(runs),
        "flood_cores": _med([r.flood_cores for r in runs]),
        "idle_cores": _med([r.idle_cores for r in runs]),
        "flood_cpu_s": _med([r.flood_cpu_s for r in runs]),
        "tail_cpu_s": _med([r.tail_cpu_s for r in runs]),
        "status_p50_ms": percentile(ms, 50),
        "status_p99_ms": percentile(ms, 99),
        "status_max_ms": max(ms) if ms else None,
        "status_requests": len(ms),
        "status_errors": sum(r.status_errors for r in runs),
        "rss_mib": _med([r.rss_kib / 1024 if r.rss_kib else None for r in runs]),
        "sent": _med([f["sent"] for f in floods]),
        "denied": _med([f["eperm"] for f in floods]),
        "sent_per_s": _med([f["sent"] / f["seconds"] for f in floods]),
        "sender_us_per_packet": _med(
            [1e6 * (f["utime"] + f["stime"]) / f["sent"] for f in floods if f["sent"]]
        ),
        "monitor_overflows": sum(r.monitor.get("overflows", 0) for r in runs),
        "monitor_triggers": sum(r.monitor.get("triggers", 0) for r in runs),
    }
    # Both floods against the kernel's bound: each starts with full buckets (TAIL_S refills a drained one).
    bound = [n * (d.burst + d.rate * r.flood["seconds"]) for r in runs if r.flood]
    pairs = list(zip([kernel_logged(r.denials) for r in runs if r.flood], bound, strict=True)) + [
        (kernel_logged(r.status_denials), n * (d.burst + d.rate * r.status_flood["seconds"]))
        for r in runs
        if r.status_flood
    ]
    if any(r.denials is not None for r in runs):
        den = [r.denials or {} for r in runs if r.flood]
        out["events"] = _med([e.get("events") for e in den])
        out["reported_packets"] = _med([e.get("packets") for e in den])
        out["logged_packets"] = _med([v for v, _ in pairs[: len(den)]])
        out["dropped_packets"] = _med([(kernel_logged(e) or 0) - e.get("packets", 0) for e in den])
        out["dropped"] = [e.get("dropped") for e in den]
        out["bound"] = _med(bound)
        out["within_bound"] = all(v is not None and v <= b for v, b in pairs)
    return out


def report(doc: dict[str, Any]) -> None:
    print(
        f"egressd denials: {doc['sandboxes']} sandboxes each sending {doc['rate_per_sandbox']:g} denied UDP "
        f"packets/s for {doc['seconds']:g} s (then {doc['status_seconds']:g} s more with status asked every "
        f"{1000 * STATUS_EVERY_S:g} ms); the agent with [denials] log = true (rate {doc['log_rate']}/s, "
        f"burst {doc['log_burst']}) against log = false"
    )
    for r in doc["runs"]:
        f, d, mib = r["flood"], r["denials"] or {}, (r["rss_kib"] or 0) / 1024
        print(
            f"repeat {r['repeat'] + 1} {r['mode']:>5}: agent CPU {r['flood_cpu_s'] or 0:.2f} s in the flood "
            f"({r['flood_cores'] or 0:.3f} cores), {r['tail_cpu_s'] or 0:.2f} s after, idle "
            f"{r['idle_cores'] or 0:.4f} cores; sent {f.get('sent')} ({f.get('eperm')} EPERM, other "
            f"{f.get('other')}) in {f.get('seconds', 0):.2f} s, sender CPU {f.get('utime', 0):.2f} + "
            f"{f.get('stime', 0):.2f} s"
        )
        print(
            f"  events {d.get('events')}, packets {d.get('packets')}, dropped {d.get('dropped')}; monitor "
            f"{r['monitor']}; RSS {mib:.1f} MiB, log {(r['log_bytes'] or 0) / 1e6:.1f} MB; status "
            f"{len(r['status_ms'])} answers, max {max(r['status_ms'], default=0):.1f} ms, "
            f"{r['status_errors']} errors, events then {(r['status_denials'] or {}).get('events')}"
        )
    for m, v in doc["modes"].items():
        print(
            f"{m}: " + ", ".join(f"{k} {v[k]:.4g}" if isinstance(v[k], float) else f"{k} {v[k]}" for k in v)
        )
    if doc["agent_us_per_event"] is not None:
        print(
            f"agent CPU, log minus no log: {doc['agent_us_per_logged_packet']:.1f} us per packet logged, "
            f"{doc['agent_us_per_event']:.1f} us per event made"
        )
