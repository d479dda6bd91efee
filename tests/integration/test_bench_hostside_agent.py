"""bench.hostside_agent still runs and checks what it measured (no timing is asserted: the machine is noisy)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def test_hostside_agent_benchmark_smoke(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.hostside_agent", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert not results["aborted"] and not results["errors"]
    runs = {r["variant"]: r for r in results["runs"]}
    assert set(runs) == {"plain", "host"} and all(r["verified"] for r in runs.values())
    # with host_interface: one host-side table per sandbox in the agent's namespace, and the sandbox's own
    # tables too (each cold start writes both); without it, none there
    assert results["host_verified"] is True
    assert runs["host"]["host_tables"] == 20 and runs["plain"]["host_tables"] == 0
    assert runs["host"]["cold_writes"] > runs["plain"]["cold_writes"] > 0
    # the restart adopted everything: no rule written, no table of the sandboxes or of H touched
    restart = results["restart"]
    assert restart["zero_writes"] is True and restart["writes"] == 0
    assert restart["handles_unchanged"] is True and restart["handles_seen"] == 40
    assert restart["host_tables_unchanged"] is True and restart["host_seen"] == 21  # 20 and the guard
    assert results["cold_s"]["plain"] > 0 and results["cold_s"]["host"] > 0 and results["cold_ratio"] > 0
