"""Metrics end to end: the real agent serves /metrics on loopback; live states, histograms, feed counters,
and each sandbox's denied packets read from its table's `denied` counter."""

import socket

import pytest

from tests.integration.test_agent import BAD4, OK4, closed_to, eventually, open_to
from tests.loopback import free_port, scrape

pytestmark = pytest.mark.root


def test_metrics_endpoint_reports_live_state_and_denied_packets(world, agent):
    s0, s1 = world.sandboxes
    port = free_port()
    a = agent(extra_config=f'[metrics]\nlisten = "127.0.0.1:{port}"\ncounters_interval = 0.2\n').start()
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=[OK4])
    a.upsert("s1", s1.netns_path, 1, deny_out=[BAD4])
    a.upsert("late", f"/run/netns/{world.prefix}nope", 1)  # never appears: pending
    a.send("not json")
    assert a.wait("s0", 1) and a.wait("s1", 1)

    def states():
        m = scrape(port)
        return {st: m[("egressd_sandboxes", (("state", st),))] for st in ("enforced", "pending", "error")}

    assert eventually(lambda: states() == {"enforced": 2, "pending": 1, "error": 0})
    m = scrape(port)
    assert m[("egressd_feed_lines_total", ())] == 4
    assert m[("egressd_feed_lines_rejected_total", ())] == 1
    assert m[("egressd_reconciles_total", (("outcome", "applied"),))] == 2
    assert m[("egressd_reconcile_duration_seconds_count", ())] >= 3
    assert m[("egressd_apply_duration_seconds_count", ())] >= 3
    assert (
        m[("egressd_apply_duration_seconds_bucket", (("le", "+Inf"),))]
        == m[("egressd_apply_duration_seconds_count", ())]
    )
    assert m[("egressd_apply_errors_total", ())] >= 1  # "late": namespace missing, retried
    assert m[("egressd_apply_retries_total", ())] >= 1
    assert ("egressd_dns_cache_names", ()) in m

    def denied(sid):
        return scrape(port).get(("egressd_denied_packets_total", (("sandbox", sid),)))

    assert eventually(lambda: denied("s0") is not None and denied("s1") is not None)
    before = denied("s0")
    assert open_to(s0.name, OK4)  # allowed: not counted
    assert closed_to(s0.name, BAD4)  # TCP reset, UDP unreachable, ping: each denied packet counted
    assert eventually(lambda: denied("s0") >= before + 3, timeout=5)
    assert scrape(port)[("egressd_denied_bytes_total", (("sandbox", "s0"),))] > 0
    assert denied("s1") == 0  # nothing denied yet
    assert open_to(s1.name, OK4) and closed_to(s1.name, BAD4)  # its own deny_out: counted in its own series
    assert eventually(lambda: denied("s1") >= 3, timeout=5)
    assert denied("late") is None  # no table, no series
    # A deleted sandbox's series go at the next counter pass.
    a.send({"type": "delete", "id": "s1"})
    assert eventually(lambda: denied("s1") is None)
    assert a.agent_status()["metrics"] == {"listen": f"127.0.0.1:{port}", "error": None}


def test_metrics_off_and_a_busy_port_does_not_stop_enforcement(world, agent):
    sb = world.sandboxes[0]
    off = agent(extra_config='[metrics]\nlisten = ""\n').start()
    assert off.agent_status()["metrics"] == {"listen": None, "error": None}
    off.stop()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        a = agent(extra_config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
        assert a.wait_log("metrics_failed")
        a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
        assert a.wait("s0", 1)
        assert closed_to(sb.name, OK4)
        assert "cannot serve metrics there" in a.agent_status()["metrics"]["error"]
