"""Every denial visible (docs/denials.md), with real packets: a denied packet from a sandbox (or from a guest
behind it) becomes one event naming the step and the entry that denied it, served by `egressd denials`;
an accepted packet becomes none; a flood gives a bounded number of events while `status` keeps answering;
a namespace that goes away leaves no socket behind."""

import json
import os
import subprocess
import time

import pytest

from egressd.agent.control import request
from netns_fixtures.probe import ping, tcp_connect, udp_echo, udp_probe
from netns_fixtures.world import SANDBOX_TCP_PORT
from tests.integration.test_hostnames import dns_agent, server  # noqa: F401 - fixtures
from tests.integration.test_monitor import eventually
from tests.loopback import free_port

pytestmark = pytest.mark.root

OK4, BAD4, OTHER4 = "198.51.100.10", "203.0.113.5", "192.0.2.77"
BAD6 = "2001:db8:bad::1"
BOUND_S = 5.0  # functional bound, not a timing claim


def denials(a, sid=None, *extra):
    out = a.cli("denials", *([sid] if sid else []), "--json", *extra)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def has(events, **want):
    return any(all(e.get(k) == v for k, v in want.items()) for e in events)


def wait_for(a, sid, **want):
    """Until `egressd denials SID` shows an event with these fields (a window closes after a second)."""
    found = eventually(lambda: has(denials(a, sid), **want), timeout=BOUND_S)
    assert found, f"no event {want} in {denials(a, sid)}"


def test_each_deny_step_reports_its_packets_with_the_entry_and_an_accepted_packet_none(world, agent):
    sb = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_out=[OK4], deny_out=[BAD4, "2001:db8:bad::/48"])
    assert a.wait("s0", 1)
    assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 1)  # the socket hears the group
    assert tcp_connect(sb.name, OK4, 80) == "open"  # the control: allowed, and no event for it
    assert tcp_connect(sb.name, BAD4, 80) == "reset"
    assert udp_echo(sb.name, BAD4, 7) == "unreachable"
    assert not ping(sb.name, BAD4)
    assert not ping(sb.name, BAD6)
    assert tcp_connect(sb.name, "169.254.169.254", 80) != "open"
    assert tcp_connect(sb.name, "10.1.2.3", 80) != "open"
    assert udp_probe(sb.name, "::c633:6401", 7).result != "echoed"  # ::198.51.100.1, IPv4-compatible
    want = [
        {"step": "deny_out", "proto": "tcp", "dst": BAD4, "dport": 80, "entry": f"{BAD4}/32", "family": 4},
        {"step": "deny_out", "proto": "udp", "dst": BAD4, "dport": 7, "entry": f"{BAD4}/32"},
        {"step": "deny_out", "proto": "icmp", "dst": BAD4, "entry": f"{BAD4}/32"},
        {"step": "deny_out", "proto": "icmpv6", "dst": BAD6, "entry": "2001:db8:bad::/48", "family": 6},
        {"step": "guard.deny", "proto": "tcp", "dst": "169.254.169.254", "entry": "169.254.0.0/16"},
        {"step": "guard.private", "proto": "tcp", "dst": "10.1.2.3", "entry": "10.0.0.0/8"},
        {"step": "embedded-ipv4", "proto": "udp", "dst": "::198.51.100.1", "entry": "::/96", "family": 6},
    ]
    for w in want:
        wait_for(a, "s0", sandbox="s0", kind="packet", **w)
    events = denials(a, "s0")
    assert not has(events, dst=OK4)
    assert all(e["count"] >= 1 and e["sandbox"] == "s0" for e in events)
    # one `denied` log line per event, and the metrics' host-wide count by step
    assert any(e.get("step") == "guard.deny" for e in a.events("denied"))
    info = a.agent_status()["denials"]
    assert info["events"] >= len(want) and info["dropped"] == {}
    # status SANDBOX shows the last few
    shown = a.cli("status", "s0")
    assert shown.returncode == 0 and "last denials:" in shown.stdout and "denied by" in shown.stdout


def test_internet_off_and_a_guest_behind_the_sandbox(world, agent):
    sb = world.sandboxes[1]
    a = agent().start()
    a.upsert("s1", sb.netns_path, 1, allow_internet_access=False, allow_out=[OK4])
    assert a.wait("s1", 1)
    assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 1)
    assert tcp_connect(sb.name, OTHER4, 443) == "reset"
    wait_for(a, "s1", step="internet", proto="tcp", dst=OTHER4, dport=443)
    assert "entry" not in next(e for e in denials(a, "s1") if e["dst"] == OTHER4)
    # a microVM behind the sandbox: forwarded, judged, and reported as the sandbox's
    assert sb.vm is not None
    assert tcp_connect(sb.vm.name, OK4, 80) == "open"
    assert not ping(sb.vm.name, OTHER4)
    wait_for(a, "s1", step="internet", proto="icmp", dst=OTHER4)
    assert not has(denials(a, "s1"), dst=OK4)


def test_a_host_name_entry_names_the_host(world, server, dns_agent):  # noqa: F811 - fixtures
    sb = world.sandboxes[0]
    server.set("bad.example.test", "203.0.113.30")
    a = dns_agent().start()
    a.upsert("s0", sb.netns_path, 1, deny_out=["bad.example.test"])
    assert a.wait("s0", 1)
    assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 1)
    assert eventually(lambda: tcp_connect(sb.name, "203.0.113.30", 80) == "reset")
    wait_for(a, "s0", step="deny_out", dst="203.0.113.30", entry="bad.example.test", host="bad.example.test")


def test_a_flood_gives_a_bounded_number_of_events_and_status_keeps_answering(world, agent):
    sb = world.sandboxes[0]
    metrics = f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\ncounters_interval = 0.5\n'
    a = agent(extra_config="[denials]\nrate = 5\nburst = 5\n" + metrics).start()
    a.upsert("s0", sb.netns_path, 1, deny_out=[BAD4])
    assert a.wait("s0", 1)
    assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 1)
    flood = (
        "import errno, socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "denied = 0\n"
        "for port in range(1000, 6000):\n"
        "    try:\n"
        f"        s.sendto(b'x', ('{BAD4}', port))\n"
        "    except PermissionError:\n"
        "        denied += 1\n"
        "print(denied)\n"
    )
    time.sleep(1.0)  # the table's denied counter read once before (each 0.5 s): the baseline of the estimate
    t0 = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", sb.name, "python3", "-c", flood], stdout=subprocess.PIPE)
    slowest = 0.0
    while proc.poll() is None:
        s0 = time.monotonic()
        request(a.socket, {"cmd": "status"}, timeout=5.0)
        slowest = max(slowest, time.monotonic() - s0)
    seconds = time.monotonic() - t0
    assert int(proc.stdout.read()) == 5000  # every one was denied (EPERM): each a distinct event, if logged
    assert slowest < 1.0
    assert eventually(lambda: denials(a, "s0") != [], timeout=BOUND_S)
    time.sleep(2.5)  # the kernel's last batch (at most 1 s) and the last windows (1 s) close
    events = denials(a, "s0")
    # the kernel logs at most burst + rate per second of flood (5 + 5 a second), per step
    assert 1 <= len(events) <= 5 + 5 * (seconds + 2)
    assert all(e["step"] == "deny_out" and e["proto"] == "udp" for e in events)
    # what the limit skipped, from the table's denied counter beyond what was logged: nearly all of it
    assert eventually(lambda: a.agent_status()["denials"]["dropped"].get("kernel", 0) > 4000, timeout=BOUND_S)


def test_a_namespace_that_goes_away_leaves_no_socket_behind(world, agent, netns_name):
    a = agent(resync_interval=0.5).start()
    path = f"/run/netns/{netns_name}"
    a.upsert("gone", path, 1, deny_out=[BAD4])
    assert a.wait("gone", 1)
    assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 1)

    def sockets():
        fds, n = f"/proc/{a.proc.pid}/fd", 0
        for fd in os.listdir(fds):
            try:
                n += os.readlink(f"{fds}/{fd}").startswith("socket:")
            except FileNotFoundError:  # closed meanwhile
                continue
        return n

    before = sockets()
    subprocess.run(["ip", "netns", "del", netns_name], check=True)
    assert eventually(lambda: a.agent_status()["monitor"]["watched"] == 0, timeout=BOUND_S)
    assert eventually(lambda: sockets() < before, timeout=BOUND_S)
    assert denials(a) == []  # nothing was denied there, and asking costs nothing


def test_the_host_side_reports_what_its_guard_drops_and_never_a_reply(world, agent):
    """host_interface only (no table in the sandbox): the host-side table marks, the guard drops and logs;
    the step and entry are the reference decision's for the sandbox of the interface the packet came in
    on. A reply on a connection opened from outside is marked too, let through, and never an event."""
    sb = world.sandboxes[0]
    a = agent(netns=world.router).start()
    policy = {"allow_internet_access": False, "allow_out": [OK4], "deny_out": [BAD4]}
    record = {"id": "h0", "revision": 1, "host_interface": sb.host_if, "network_policy": policy}
    a.send({"type": "upsert", "sandbox": record})
    a.wait_log("host_applied", sandbox="h0", revision=1)
    assert tcp_connect(world.inet, sb.addr4, SANDBOX_TCP_PORT) == "open"  # replies to 10.255.0.2: private
    assert tcp_connect(world.inet, sb.addr6, SANDBOX_TCP_PORT) == "open"
    assert tcp_connect(sb.name, OK4, 80) == "open"  # the control: allowed
    assert tcp_connect(sb.name, BAD4, 80) != "open"
    assert not ping(sb.name, OTHER4)
    wait_for(a, "h0", where="host", step="deny_out", proto="tcp", dst=BAD4, dport=80, entry=f"{BAD4}/32")
    wait_for(a, "h0", where="host", step="internet", proto="icmp", dst=OTHER4)
    events = denials(a, "h0")
    assert not has(events, dst=world.inet_addr4) and not has(events, dst=world.inet_addr6)  # replies
    assert not has(events, dst=OK4)
