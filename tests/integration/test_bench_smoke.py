"""The apply benchmark still runs and verifies what it applied (no timing is asserted: the machine is noisy)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def test_apply_benchmark_smoke(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.apply", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["sizes"] and all(size["verified"] for size in results["sizes"])
    assert not results["aborted"]


def test_agent_benchmark_smoke(tmp_path):
    out = tmp_path / "agent.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.agent", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["restart"]["zero_writes"] is True and results["restart"]["handles_unchanged"] is True


def test_dns_benchmark_smoke(tmp_path):
    out = tmp_path / "dns.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dns", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["change_to_all_enforced_s"] is not None and results["queries_a_per_s"] > 0


def test_tamper_benchmark_smoke(tmp_path):
    out = tmp_path / "tamper.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.tamper", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    phases = {p["mode"]: p for p in json.loads(out.read_text())["phases"]}
    for p in phases.values():  # every tamper repaired, and the repair checked in the kernel, both ways
        assert p["error"] is None and p["verified"] == len(p["tampers"]) > 0
    assert phases["monitor"]["high_fds"] == phases["monitor"]["monitor"]["watched"] > 0
    assert phases["resync"]["high_fds"] == 0 and phases["resync"]["monitor"] is None


def test_hostside_benchmark_smoke(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.hostside", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["adopted"] == results["sandboxes"] == 20  # every table written was read back as written
    assert results["cold_ms_per_sandbox"] > 0 and results["base_update_ms_per_sandbox"] > 0


def test_bench_suite_smoke(tmp_path):
    """`python -m bench` runs its benches, reads their JSON and writes one results file with every figure."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "apply", "hostside", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["settings"]["smoke"] is True and results["machine"]["nproc"]
    assert set(results["benches"]) == {"apply", "hostside"} and results["failed"] == []
    for name, bench in results["benches"].items():
        assert bench["exit_status"] == 0 and bench["error"] is None and bench["wall_seconds"] > 0
        assert bench["results"], name  # the module's whole JSON
        figures = [f for f in results["figures"] if f["bench"] == name]
        assert figures and figures == bench["figures"]
        assert all("ratio" in f and "met" in f for f in figures)
        assert any(f["ratio"] is not None and f["ratio"] > 0 for f in figures), name
    goals = [f for f in results["figures"] if f["goal"]]
    assert goals and all(isinstance(f["met"], bool) for f in goals)
    assert "ratio" in proc.stdout and "[1] baseline:" in proc.stdout


def test_datapath_benchmark_smoke(tmp_path):
    out = tmp_path / "datapath.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.datapath", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert not results["aborted"] and not results["errors"]
    for family, rows in results["results"].items():  # every configuration moved data, in every family
        for key, row in rows.items():
            assert row["median_gbps"] is not None and row["median_gbps"] > 0, (family, key)
    assert {"none", "egressd", "nft-linear"} <= results["results"]["v4"].keys()
    # the denied address answered without a filter and was refused by every filter: no open box measured
    assert results["enforcement_ok"] is True
    for key, check in results["enforcement"].items():
        for family in check.values():
            assert family["ok"] and family["allowed"] == "open"
            assert (family["denied"] == "open") == (key in ("none", "conntrack"))
