"""The agent end to end: `egressd run` follows a feed and real packets obey it, across faults and restarts."""

import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

from netns_fixtures.probe import ping, tcp_connect, udp_echo
from tests.integration.conftest import live_name, nft_table

pytestmark = pytest.mark.root

OK4, OTHER4, BAD4 = "198.51.100.10", "198.51.100.20", "203.0.113.5"
OK6, BAD6 = "2001:db8:1::10", "2001:db8:bad::5"


def open_to(ns, dst):
    return tcp_connect(ns, dst, 80) == "open"


def closed_to(ns, dst):
    """Denied the egressd way: TCP reset, UDP unreachable, no ping."""
    return (tcp_connect(ns, dst, 80), udp_echo(ns, dst, 7), ping(ns, dst)) == ("reset", "unreachable", False)


def eventually(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def table_handle(ns):
    """The table's handle as the kernel holds it; None only when nft says there is no table."""
    table = nft_table(ns)
    return None if table is None else next(i["table"]["handle"] for i in table if "table" in i)


def test_updates_both_ways_then_delete(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=[OK4, OK6])
    assert a.wait("s0", 1)
    assert open_to(sb.name, OK4) and open_to(sb.name, OK6)
    assert closed_to(sb.name, OTHER4) and closed_to(sb.name, BAD6)
    a.upsert("s0", sb.netns_path, 2, allow_internet_access=False, allow_out=[OK4, OTHER4])  # loosen v4
    assert a.wait("s0", 2)
    assert open_to(sb.name, OTHER4) and closed_to(sb.name, OK6)
    a.upsert("s0", sb.netns_path, 3, allow_internet_access=False)  # tighten
    assert a.wait("s0", 3)
    assert closed_to(sb.name, OK4)
    a.send({"type": "delete", "id": "s0"})
    assert eventually(lambda: "s0" not in a.status())
    assert nft_table(sb.name) is None
    assert open_to(sb.name, BAD4) and open_to(sb.name, BAD6)


def test_snapshot_forgets_what_it_does_not_list(world, agent):
    s0, s1 = world.sandboxes
    a = agent().start()
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False)
    a.upsert("s1", s1.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1) and a.wait("s1", 1)
    assert closed_to(s0.name, OK4)  # s0's table is there before the snapshot forgets it
    record = {
        "id": "s1",
        "netns": s1.netns_path,
        "revision": 2,
        "network_policy": {"allow_internet_access": False},
    }
    a.send({"type": "snapshot", "sandboxes": [record]})
    assert eventually(lambda: "s0" not in a.status())
    assert nft_table(s0.name) is None and open_to(s0.name, OK4)
    assert closed_to(s1.name, OK4)


def test_a_namespace_that_appears_late_is_enforced_when_it_does(world, agent):
    sb = world.sandboxes[1]
    late = f"/run/netns/{world.prefix}late"
    a = agent().start()
    a.upsert("late", late, 1, allow_internet_access=False)
    assert eventually(lambda: a.status().get("late", {}).get("state") == "pending")
    assert not os.path.exists(late), "egressd must never create a namespace"
    assert open_to(sb.name, OK4)
    open(late, "w").close()
    try:
        subprocess.run(["mount", "--bind", sb.netns_path, late], check=True)
        assert a.wait("late", 1, timeout=5)
        assert closed_to(sb.name, OK4)
    finally:
        a.stop()  # it holds the namespace open through this path
        subprocess.run(["umount", "--lazy", late], check=False)
        os.unlink(late)


def test_drift_is_repaired_within_the_resync_interval(world, agent):
    sb = world.sandboxes[0]
    # The resync alone: with the change monitor on, the table is back before the probe below could pass
    # (that path is tested in test_monitor.py).
    a = agent(resync_interval=0.5, extra_config="watch_changes = false\n").start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    world.exec(sb.name, ["nft", "delete", "table", "inet", "egressd"])
    assert open_to(sb.name, OK4)
    assert a.wait_log("repaired", detail="table was deleted", timeout=5)
    assert closed_to(sb.name, OK4)
    world.exec(
        sb.name, ["nft", "flush", "chain", "inet", "egressd", live_name(sb.name, "decide")]
    )  # in place
    assert a.wait_log("repaired", detail="table was altered in place", timeout=5)
    assert eventually(lambda: closed_to(sb.name, OK4))


def test_bad_lines_among_good_ones_are_skipped_and_reported(world, agent):
    s0, s1 = world.sandboxes
    a = agent().start()
    good0 = {
        "type": "upsert",
        "sandbox": {"id": "s0", "netns": s0.netns_path, "network_policy": {"deny_out": [OK4]}},
    }
    good1 = {
        "type": "upsert",
        "sandbox": {"id": "s1", "netns": s1.netns_path, "network_policy": {"deny_out": [OK4]}},
    }
    a.send("{not json", good0, "[1, 2]", {"type": "rename"}, '{"type": "delete"}', good1, "x" * 100)
    assert a.wait("s0") and a.wait("s1")
    assert closed_to(s0.name, OK4) and closed_to(s1.name, OK4)
    rejected = {e["line"]: e["error"] for e in a.wait_log("feed_line_rejected", count=5)}
    assert sorted(rejected) == [1, 3, 4, 5, 7]
    assert rejected[1].startswith("not valid JSON")
    assert "unknown event type 'rename'" in rejected[4]
    assert a.agent_status()["feed"]["rejected"] == 5


def test_an_older_revision_is_ignored(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", sb.netns_path, 5, allow_internet_access=False)
    a.upsert("s0", sb.netns_path, 3)
    a.upsert("s0", sb.netns_path, 4, deny_out=[OK4])
    a.wait_log("stale_ignored", count=2, sandbox="s0")
    assert a.wait("s0", 5)
    assert closed_to(sb.name, OK4) and closed_to(sb.name, BAD4)
    assert a.status()["s0"]["revision"] == 5


def test_an_invalid_first_policy_gets_deny_all_except_guard_allow(world, agent):
    sb = world.sandboxes[0]
    a = agent(extra_config=f'[guard]\nallow = ["{OTHER4}"]\n').start()
    a.upsert("s0", sb.netns_path, 1, deny_out=["999.1.1.1"])
    assert eventually(lambda: a.status().get("s0", {}).get("state") == "error")
    st = a.status()["s0"]
    assert "network_policy.deny_out[0] '999.1.1.1'" in st["error"] and st["error"].startswith(
        "closed (deny-all)"
    )
    assert closed_to(sb.name, BAD4) and closed_to(sb.name, BAD6)
    assert open_to(sb.name, OTHER4)
    assert not a.wait("s0", 1, timeout=0.2)


def test_an_invalid_update_keeps_the_last_good_policy(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", sb.netns_path, 1, deny_out=[BAD4, BAD6])
    assert a.wait("s0", 1)
    a.upsert("s0", sb.netns_path, 2, deny_out=["example.com:443"])
    assert eventually(lambda: a.status()["s0"]["state"] == "error")
    assert "revision 2 rejected, still enforcing revision 1" in a.status()["s0"]["error"]
    assert closed_to(sb.name, BAD4) and closed_to(sb.name, BAD6) and open_to(sb.name, OK4)


def test_sigkill_keeps_enforcing_and_a_restart_adopts_without_rewriting(world, agent):
    s0, s1 = world.sandboxes
    a = agent()
    a.start()
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=[OK4])
    a.upsert("s1", s1.netns_path, 1, deny_out=[OK4, OK6])
    assert a.wait("s0", 1) and a.wait("s1", 1)
    handles = (table_handle(s0.name), table_handle(s1.name))
    a.kill()
    assert closed_to(s0.name, BAD4) and closed_to(s1.name, OK6)  # enforcement outlives the agent
    a.start()
    assert a.wait("s0", 1) and a.wait("s1", 1)
    assert (table_handle(s0.name), table_handle(s1.name)) == handles, "a table was rewritten"
    assert {r["id"]: r["writes"] for r in a.status().values()} == {"s0": 0, "s1": 0}
    assert len(a.events("adopted")) == 2 or a.agent_status()["reconciles"]["unchanged"] >= 2
    assert open_to(s0.name, OK4) and closed_to(s0.name, BAD4)


def test_a_restart_rewrites_a_table_tampered_while_the_agent_was_down(world, agent):
    sb = world.sandboxes[0]
    a = agent()
    a.start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    a.stop()
    world.exec(sb.name, ["nft", "flush", "chain", "inet", "egressd", live_name(sb.name, "decide")])
    assert open_to(sb.name, OK4)
    a.start()
    assert a.wait("s0", 1)  # adopted on its fingerprint at once, then compared whole: repaired
    a.wait_log("repaired", detail="table was altered in place")
    assert closed_to(sb.name, OK4)


def test_sigterm_exits_cleanly_and_leaves_every_table(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    assert a.stop(signal.SIGTERM) == 0
    assert a.events("stopped")
    assert closed_to(sb.name, OK4) and closed_to(sb.name, OK6)
    assert not os.path.exists(a.socket)


def test_status_and_wait_commands(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    assert stat.S_IMODE(os.stat(a.socket).st_mode) == 0o600
    assert a.cli("wait", "s0", "--revision", "1", "--timeout", "0.3").returncode == 1
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    done = a.cli("wait", "s0", "--revision", "1", "--timeout", "10")
    assert done.returncode == 0, done.stderr
    status = json.loads(a.cli("status", "--json").stdout)
    (row,) = status["sandboxes"]
    assert {k: row[k] for k in ("id", "netns", "state", "revision", "error")} == {
        "id": "s0",
        "netns": sb.netns_path,
        "state": "enforced",
        "revision": 1,
        "error": None,
    }
    assert isinstance(row["since"], float)
    table = a.cli("status").stdout
    assert "s0" in table and "enforced" in table


def test_sighup_reloads_the_config_and_re_renders(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", sb.netns_path, 1)
    assert a.wait("s0", 1)
    assert open_to(sb.name, OK4)
    a.config_path.write_text(a.config_path.read_text() + f'[guard]\ndeny = ["{OK4}"]\n')
    a.proc.send_signal(signal.SIGHUP)
    a.wait_log("reloaded")
    assert eventually(lambda: closed_to(sb.name, OK4))
    a.config_path.write_text(a.config_path.read_text() + "[bogus]\n")
    a.proc.send_signal(signal.SIGHUP)
    assert "unknown key 'bogus'" in a.wait_log("reload_failed")[0]["error"]
    assert closed_to(sb.name, OK4)


def test_unix_feed_takes_several_producers(world, agent, tmp_path):
    s0, s1 = world.sandboxes
    feed = tmp_path / "feed.sock"
    a = agent(feed=f"unix:{feed}").start()
    assert stat.S_IMODE(os.stat(feed).st_mode) == 0o600
    producers = []
    for sid, sb in (("s0", s0), ("s1", s1)):
        p = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        p.connect(str(feed))
        producers.append(p)
        ev = {
            "type": "upsert",
            "sandbox": {"id": sid, "netns": sb.netns_path, "network_policy": {"deny_out": [OK4]}},
        }
        p.sendall(json.dumps(ev).encode() + b"\n")
    try:
        assert a.wait("s0") and a.wait("s1")
        assert closed_to(s0.name, OK4) and closed_to(s1.name, OK4)
    finally:
        for p in producers:
            p.close()


def test_a_truncated_feed_file_is_followed_from_its_start(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", sb.netns_path, 1, deny_out=[OK4])
    assert a.wait("s0", 1)
    a.feed_path.write_text("")  # truncated, as by logrotate copytruncate
    time.sleep(0.3)
    a.upsert("s0", sb.netns_path, 2, deny_out=[OTHER4])
    assert a.wait("s0", 2)
    assert open_to(sb.name, OK4) and closed_to(sb.name, OTHER4)


def test_a_restart_replaying_old_lines_never_applies_an_old_policy(world, agent):
    """The file feed is read from its start again; history without revisions must not flap the table."""
    sb = world.sandboxes[0]
    a = agent()
    a.start()
    a.upsert("s0", sb.netns_path)  # open
    a.upsert("s0", sb.netns_path, deny_out=[OK4])
    a.upsert("s0", sb.netns_path, allow_internet_access=False)  # closed: the latest
    assert eventually(lambda: closed_to(sb.name, OK4) and closed_to(sb.name, BAD4))
    handle = table_handle(sb.name)
    a.kill()
    a.start()
    assert a.wait("s0")
    assert a.status()["s0"]["writes"] == 0 and table_handle(sb.name) == handle
    assert closed_to(sb.name, BAD4)


def test_an_unusable_feed_socket_path_stops_the_agent_with_a_clear_error(agent, tmp_path):
    planted = tmp_path / "feed.sock"
    planted.write_text("not a socket")
    a = agent(feed=f"unix:{planted}")
    a.start(wait_ready=False)
    assert a.proc.wait(15) == 1
    (failed,) = a.events("startup_failed")
    assert "exists and is a regular file, not a socket" in failed["error"]
    assert planted.read_text() == "not a socket"


def test_systemd_notify_protocol(world, agent, tmp_path):
    """READY=1 after the first reconcile, STATUS= with counts, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
    sb = world.sandboxes[0]
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    try:
        a = agent()
        a.start()
        a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
        assert a.wait("s0", 1)
        a.stop()
        a.env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
        a.start(wait_ready=False)
        messages = []
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=1 enforced, 0 pending, 0 error" in ready
        assert a.stop(signal.SIGTERM) == 0
        rest = []
        while not any("STOPPING=1" in m for m in rest):
            rest.append(listener.recv(4096).decode())
    finally:
        listener.close()


def test_stdin_feed_and_its_end(world, agent):
    sb = world.sandboxes[0]
    a = agent(feed="stdin")
    a.start(stdin=subprocess.PIPE)
    ev = {
        "type": "upsert",
        "sandbox": {"id": "s0", "netns": sb.netns_path, "network_policy": {"deny_out": [OK4]}},
    }
    a.proc.stdin.write(json.dumps(ev).encode() + b"\n")
    a.proc.stdin.close()  # the producer goes away: the agent keeps enforcing
    assert a.wait("s0")
    a.wait_log("feed_ended")
    assert closed_to(sb.name, OK4) and a.running()


def test_a_corrupt_state_file_is_reported_and_rebuilt_from_the_feed(world, agent):
    sb = world.sandboxes[0]
    a = agent()
    a.start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    state = a.dir / "state" / "state.json"
    # A new sandbox's table does not wait for the state write; the write follows within moments.
    assert eventually(lambda: state.exists() and b'"s0"' in state.read_bytes())
    a.kill()
    state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])  # torn, as by a bad disk
    a.start()
    assert "corrupt" in a.events("state_unreadable")[0]["error"]
    assert a.wait("s0", 1)  # the file feed is read from its start: desired state is back
    assert closed_to(sb.name, OK4)
    assert eventually(lambda: b'"s0"' in state.read_bytes())  # and written again, whole
