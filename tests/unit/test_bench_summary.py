"""Each bench module's summary() reads the JSON that module writes, and the suite prints one table of them.

The dicts below are trimmed from real `--smoke --json` runs, so a change of a module's JSON that breaks its
summary() shows up here without root.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

import bench.__main__ as suite
from bench import agent, apply, denials, denials_figures, dns, hostside, tamper
from bench.figures import Figure
from egressd.model.config import Config


def _by_name(figures: list[Figure]) -> dict[str, Figure]:
    out = {f.name: f for f in figures}
    assert len(out) == len(figures), "figure names must be distinct within a bench"
    return out


def _size(n: int, k: int, warm: float | None, base: float | None) -> dict[str, Any]:
    return {
        "namespaces": n,
        "entries": k,
        "verified": True,
        "repeats_done": 5,
        "phases": {
            "egressd_warm": {"median_ms_per_ns": warm},
            "egressd_cold": {"median_ms_per_ns": 2.4},
            "baseline": {"median_ms_per_ns": base},
        },
    }


def test_apply_summary_ratio_goal_at_k10_and_latency_goal_at_k10000() -> None:
    results = {
        "settings": {"namespaces": 50, "entries": [10, 1000], "single": 10000, "repeats": 5, "smoke": False},
        "aborted": None,
        "sizes": [
            _size(50, 10, 1.24, 18.7),
            _size(50, 1000, 9.0, 25.5),
            _size(1, 10000, 120.0, 98.0),
        ],
    }
    figs = apply.summary(results)
    assert [f.bench for f in figs] == ["apply"] * 3
    k10, k1000, k10000 = figs
    assert k10.egressd == 1.24 and k10.baseline == 18.7
    assert k10.baseline_name == "ip netns exec NS nft -j -f FILE, per namespace"
    assert math.isclose(k10.ratio or 0, 18.7 / 1.24) and k10.goal == ">= 15x" and k10.met is True
    assert k1000.goal is None and k1000.met is None and math.isclose(k1000.ratio or 0, 25.5 / 9.0)
    assert k10000.goal == "< 100 ms" and k10000.met is False  # 120 ms: missed, whatever the ratio
    assert "K=10,000" in k10000.name and "N=1 " in k10000.name


def test_apply_summary_ratio_goal_missed_and_aborted_size() -> None:
    figs = apply.summary({"sizes": [_size(2, 10, 2.23, 19.95), _size(1, 500, None, None)]})
    assert figs[0].met is False and math.isclose(figs[0].ratio or 0, 19.95 / 2.23)
    assert figs[1].egressd is None and figs[1].ratio is None and figs[1].met is None
    assert apply.summary({"sizes": []}) == []


def _agent_results(restart_writes: int = 0, cold_s: float = 0.415) -> dict[str, Any]:
    """Trimmed from `python -m bench.agent --smoke --json`."""
    rep = {
        "baseline_s": 0.462,
        "cold_s": cold_s,
        "cold_proc": {"vmhwm_kib": 62972, "vmrss_kib": 62972, "fds": 51},
        "restart_s": 0.305,
        "restart_writes": restart_writes,
        "restart_proc": {"vmhwm_kib": 62036, "vmrss_kib": 62036, "fds": 51},
        "handles_checked": 20,
        "handles_changed": 0,
        "cli_checked": 20,
        "cli_changed": 0,
        "verified": True,
    }
    return {
        "settings": {"sandboxes": 20, "repeats": 1, "storm_events": 50, "storm_sandboxes": 10, "smoke": True},
        "goals": {"idle_p99_ms": 20.0, "cold_start_s": 3.0, "restart_s": 1.0},
        "aborted": None,
        "errors": [],
        "latency": {
            "idle": {"kernel_ms": {"n": 20, "p50": 7.56, "p99": 11.5, "max": 11.5}},
            "storm": {
                "kernel_ms": {"n": 20, "p50": 27.7, "p99": 91.4, "max": 91.4},
                "rounds": [
                    {"events": 50, "events_per_s": 432.6},
                    {"events": 50, "events_per_s": 497.8},
                    {"events": 50, "events_per_s": 354.4},
                ],
            },
        },
        "cold_start": {"repeats": [rep, dict(rep, cold_s=cold_s + 0.2, baseline_s=0.5)]},
        "restart": {"repeats_verified": 2, "zero_writes": restart_writes == 0, "handles_unchanged": True},
    }


def test_agent_summary() -> None:
    figs = _by_name(agent.summary(_agent_results()))
    p99 = figs["event -> enforced (kernel), idle, p99"]
    assert p99.egressd == 11.5 and p99.goal == "< 20 ms" and p99.met is True
    assert figs["event -> enforced (kernel), idle, p50"].met is None
    assert figs["event -> enforced (kernel), during 50-event storms, p99"].egressd == 91.4
    assert figs["storm throughput, events/s"].egressd == 432.6  # median of the rounds
    cold = figs["cold start, 20 sandboxes, start -> all enforced"]
    assert math.isclose(cold.egressd or 0, 0.515) and math.isclose(cold.baseline or 0, 0.481)
    assert cold.baseline_name and "nft -j -f" in cold.baseline_name
    assert math.isclose(cold.ratio or 0, 0.481 / 0.515) and cold.goal == "< 3 s" and cold.met is True
    restart = figs["restart adopting 20 unchanged sandboxes"]
    assert restart.egressd == 0.305 and restart.met is True and restart.ratio is None
    writes = figs["restart: rule writes, all repeats"]
    assert writes.egressd == 0 and writes.goal == "0" and writes.met is True
    assert math.isclose(figs["agent RSS after cold start, 20 sandboxes"].egressd or 0, 62972 * 1024 / 1e6)


def test_agent_summary_goals_missed_and_nothing_measured() -> None:
    figs = _by_name(agent.summary(_agent_results(restart_writes=3, cold_s=4.2)))
    assert figs["restart: rule writes, all repeats"].egressd == 6  # summed over both repeats
    assert figs["restart: rule writes, all repeats"].met is False
    assert figs["cold start, 20 sandboxes, start -> all enforced"].met is False
    empty = agent.summary({"settings": {"sandboxes": 5}, "latency": {}, "cold_start": {"repeats": []}})
    assert all(f.egressd is None and f.met is None for f in empty)


def _dns_results(a: float = 1055.0, rss_mib: float = 120.0) -> dict[str, Any]:
    """Shaped as `python -m bench.dns --json` writes it (values from the full run in docs/performance.md)."""
    return {
        "settings": {"sandboxes": 1000, "shared": 100, "distinct": 10000, "per_shared": 10, "ttl": 10.0},
        "cold_start_all_enforced_s": 68.0,
        "names": 10100,
        "window_s": 30.0,
        "queries_a_per_s": a,
        "queries_aaaa_per_s": 1050.0,
        "names_per_ttl": 1010.0,
        "ratio_a_to_floor": a / 1010.0,
        "agent_rss_mib": rss_mib,
        "change_sandboxes": 100,
        "change_to_all_enforced_s": 4.2,
        "change_first_to_last_sandbox_s": 3.3,
    }


def test_dns_summary() -> None:
    figs = dns.summary(_dns_results())
    q = figs[0]
    assert (
        q.name.startswith("A queries/s") and q.baseline == 1010.0 and "names / TTL" in (q.baseline_name or "")
    )
    assert math.isclose(q.ratio or 0, 1055 / 1010) and q.goal == "within 10% of floor" and q.met is True
    rss = _by_name(figs)["agent RSS, 1000 sandboxes, 10100 names"]
    assert rss.unit == "MB" and math.isclose(rss.egressd or 0, 120 * 1.048576) and rss.met is True
    assert rss.goal == "< 150 MB"


@pytest.mark.parametrize(("a", "met"), [(1115.0, False), (905.0, False), (915.0, True)])
def test_dns_summary_queries_goal_both_ways(a: float, met: bool) -> None:
    assert dns.summary(_dns_results(a=a))[0].met is met


def test_dns_summary_rss_in_decimal_megabytes() -> None:
    # 145 MiB is 152 MB: over the goal, which is in decimal MB.
    rss = next(f for f in dns.summary(_dns_results(rss_mib=145.0)) if f.unit == "MB")
    assert rss.met is False


def test_hostside_summary() -> None:
    results = {
        "sandboxes": 20,
        "entries": 10,
        "repeats": 1,
        "cold_ms_per_sandbox": 4.82,
        "update_ms_per_sandbox": 16.9,
        "adopt_ms_per_sandbox": 0.292,
        "base_cold_ms_per_sandbox": 32.7,
        "base_update_ms_per_sandbox": 42.6,
        "adopted": 20,
        "cold_ratio": 32.7 / 4.82,
        "update_ratio": 42.6 / 16.9,
    }
    cold, update, adopt = hostside.summary(results)
    assert math.isclose(cold.ratio or 0, results["cold_ratio"]) and cold.baseline == 32.7
    assert math.isclose(update.ratio or 0, results["update_ratio"]) and update.met is None
    assert adopt.egressd == 0.292 and adopt.baseline is None and "20/20 adopted" in (adopt.note or "")


def test_tamper_summary() -> None:
    def phase(mode: str, resync: float, p50: float, p99: float, rss: int, fds: int) -> dict[str, Any]:
        return {
            "mode": mode,
            "resync_interval": resync,
            "agent": {"vmhwm_kib": rss, "vmrss_kib": rss, "fds": fds},
            "error": None,
            "latency_ms": {"n": 4, "p50": p50, "p99": p99, "max": p99},
            "verified": 4,
            "tampers": [{}] * 4,
        }

    results = {
        "args": {"sandboxes": 6, "tampers": 4, "resync": 2.0, "smoke": True},
        "phases": [
            phase("monitor", 3600.0, 9.22, 14.87, 52408, 22),
            phase("resync", 2.0, 759.2, 1622.5, 51492, 16),
        ],
        "aborted": None,
        "errors": [],
    }
    p50, p99, rss = tamper.summary(results)
    assert p50.egressd == 9.22 and p50.baseline == 759.2 and math.isclose(p50.ratio or 0, 759.2 / 9.22)
    assert p50.baseline_name == "periodic resync alone (resync_interval = 2 s)"
    assert "4/4 monitor, 4/4 resync" in (p50.note or "")
    assert p99.egressd == 14.87 and p99.baseline == 1622.5
    assert math.isclose(rss.egressd or 0, 52408 * 1024 / 1e6) and rss.ratio is not None and rss.ratio < 1
    assert tamper.summary({"phases": []})[0].egressd is None


def _denials_results(cores: float, logged: int, bound: float) -> dict[str, Any]:
    common = {"idle_cores": 0.0, "status_p99_ms": 4.04, "status_max_ms": 6.1, "rss_mib": 50.0}
    return {
        "sandboxes": 5,
        "seconds": 2.0,
        "modes": {
            "log": {
                **common,
                "flood_cores": cores,
                "sent_per_s": 499.95,
                "sender_us_per_packet": 62.6,
                "denied": 1000,
                "events": logged - 300,
                "logged_packets": logged,
                "dropped_packets": 300,
                "dropped": [{"agent": 300}],
                "bound": bound,
                "within_bound": logged <= bound,
            },
            "nolog": {**common, "flood_cores": 0.005, "rss_mib": 53.1, "sender_us_per_packet": 84.7},
        },
        "agent_us_per_event": 30.15,
        "agent_us_per_logged_packet": 21.0,
        "runs": [],
    }


def test_denials_summary() -> None:
    figs = _by_name(denials.summary(_denials_results(0.02, 995, 1000.05)))
    cpu = figs["agent CPU, 5 sandboxes flooding denied packets, cores"]
    assert cpu.egressd == 0.02 and cpu.baseline == 0.005 and cpu.unit == "cores"
    assert cpu.baseline_name == "the same agent and flood, [denials] log = false"
    assert cpu.goal == "<= 0.1 core at N=200" and cpu.met is True and math.isclose(cpu.ratio or 0, 0.25)
    logged = figs["denied packets the kernel logged to the agent"]
    assert logged.egressd == 995 and logged.baseline == 1000.05 and logged.met is True
    dropped = figs["logged packets the agent dropped (not made events)"]
    assert dropped.egressd == 300 and dropped.goal is None and "695 events made" in (dropped.note or "")
    per = figs["agent CPU per logged packet (log minus no log), us"]
    assert per.egressd == 21.0 and "30.15" in (per.note or "")
    assert figs["status during the flood, max, ms"].egressd == 6.1
    assert figs["agent RSS after the flood, MiB"].baseline == 53.1
    over = _by_name(denials.summary(_denials_results(0.45, 1200, 1000.05)))
    assert over["agent CPU, 5 sandboxes flooding denied packets, cores"].met is False
    assert over["denied packets the kernel logged to the agent"].met is False
    empty = denials.summary({"modes": {}})  # nothing measured: every figure there, none met
    assert all(f.egressd is None and f.met is None for f in empty)


def test_denials_mode_figures_count_drops_as_logged_and_bound_both_floods() -> None:
    flood = {"sent": 1000, "eperm": 1000, "seconds": 2.0, "utime": 0.1, "stime": 0.1}
    run = denials_figures.Run(
        "log",
        0,
        idle_s=1.0,
        idle_cpu_s=0.01,
        flood=flood,
        flood_cpu_s=0.2,
        denials={"events": 600, "packets": 700, "open": 0, "dropped": {"agent": 290, "nats": 5}},
        status_flood={**flood, "seconds": 1.0},
        status_denials={"events": 10, "packets": 10, "open": 0, "dropped": {}},
        status_ms=[1.0, 2.0, 9.0],
    )
    out = denials_figures.mode_figures([run], 5, Config())  # bound 5 x (100 + 50 x 2) = 1,000
    assert out["logged_packets"] == 990 and out["dropped_packets"] == 290 and out["events"] == 600
    assert out["bound"] == 1000 and out["within_bound"] is True
    assert out["flood_cores"] == 0.1 and out["status_max_ms"] == 9.0 and out["sender_us_per_packet"] == 200
    run.status_denials = {"events": 751, "packets": 751, "open": 0, "dropped": {}}  # over 5 x (100 + 50)
    assert denials_figures.mode_figures([run], 5, Config())["within_bound"] is False
    assert "events" not in denials_figures.mode_figures(
        [denials_figures.Run("nolog", 0, flood=flood)], 5, Config()
    )


# --- the suite's table ---------------------------------------------------------------------------------


def test_table_columns_ratio_goal_met_and_baseline_notes() -> None:
    figs = [
        Figure("apply", "apply (warm), K=10", "ms", 1.24, 18.7, "nft -f", ">= 15x", True),
        Figure("apply", "apply (warm), K=10,000", "ms", 120.0, 98.0, "nft -f", "< 100 ms", False),
        Figure(
            "datapath",
            "throughput",
            "Gbit/s",
            9.7,
            10.0,
            "no ruleset",
            ">= 95 %",
            True,
            lower_is_better=False,
        ),
        Figure("agent", "restart: rule writes", "writes", 0, goal="0", met=True),
        Figure("agent", "not measured", "s", None),
    ]
    lines = suite.table(figs).splitlines()
    assert lines[0].split() == ["bench", "figure", "egressd", "baseline", "ratio", "goal", "met"]
    assert set(lines[1]) == {"-"}
    k10, k10000, tput, writes, missing = lines[2:7]
    assert "1.24 ms" in k10 and "18.7 ms [1]" in k10 and "15.1x" in k10 and k10.endswith("yes")
    assert "0.82x" in k10000 and k10000.endswith("NO")
    assert "9.70 Gbit/s" in tput and "10.0 Gbit/s [2]" in tput and "0.97x" in tput
    assert "0 writes" in writes and writes.endswith("yes")
    assert missing.split()[-1] == "-"  # no value, no ratio, no goal
    assert "[1] baseline: nft -f" in lines and "[2] baseline: no ruleset" in lines
    # Columns line up: every row's "egressd" cell ends where the header's does.
    end = lines[0].index("egressd") + len("egressd")
    assert all(line[:end].endswith(("ms", "Gbit/s", "writes", "-")) for line in lines[2:7])


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (None, "ms", "-"),
        (0, "writes", "0 writes"),
        (12000, "queries/s", "12,000 queries/s"),
        (1234.5, "events/s", "1,234 events/s"),
        (18.74, "ms", "18.7 ms"),
        (1.2345, "s", "1.23 s"),
        (0.29199, "ms", "0.292 ms"),
    ],
)
def test_fmt_value(value: float | None, unit: str, text: str) -> None:
    assert suite.fmt_value(value, unit) == text


def test_suite_command_lines() -> None:
    """Full runs pass the issue's sizes, smoke runs --smoke; --repeats and --max-seconds only where taken."""
    by = {b.name: b for b in suite.BENCHES}
    out = suite.Path("/tmp/x.json")
    full = suite.command_for(by["agent"], out, False, 2, {"--max-seconds", "--repeats", "--smoke"})
    assert full[1:6] == ["-m", "bench.agent", "--json", "/tmp/x.json", "--sandboxes"]
    assert full[-4:] == ["--repeats", "2", "--max-seconds", "600"]
    smoke = suite.command_for(by["hostside"], out, True, None, {"--repeats", "--smoke"})
    assert smoke[1:] == ["-m", "bench.hostside", "--json", "/tmp/x.json", "--smoke"]
    assert sum(b.seconds for b in suite.BENCHES) <= 70 * 60  # the full suite is bounded to about 70 minutes
