"""Tamper repair from nftables change events: a table changed inside a sandbox is put back within moments,
long before the resync (set to an hour here), and the agent's own writes cost nothing extra.

The first half runs `egressd run` and tampers with `nft` inside the sandbox, as a tenant with CAP_NET_ADMIN
would; the second half drives ChangeMonitor in this process against the world's namespaces.
"""

import asyncio
import contextlib
import itertools
import os
import re
import socket
import struct
import subprocess
import time

import pytest

from egressd.kernel.monitor import ChangeMonitor
from egressd.kernel.monitor_socket import FD_BASE, open_watch, raise_fd_limit
from egressd.kernel.netns import netns_id
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render
from netns_fixtures._nsutil import netns_socket
from netns_fixtures.probe import ping, tcp_connect, udp_echo
from tests.integration.conftest import live_name, nft_json, nft_table

pytestmark = pytest.mark.root

OK4, BAD4 = "198.51.100.10", "203.0.113.5"
HOUR = 3600
REPAIR_BOUND_S = 5.0  # functional bound, not a timing claim: the machine is shared and noisy


def open_to(ns, dst):
    return tcp_connect(ns, dst, 80) == "open"


def closed_to(ns, dst):
    return (tcp_connect(ns, dst, 80), udp_echo(ns, dst, 7), ping(ns, dst)) == ("reset", "unreachable", False)


def eventually(check, timeout=REPAIR_BOUND_S):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def has_table(ns):
    return nft_table(ns) is not None


def as_written(listing):
    """A table's listing without what changes when no one edits it (handles, counter values, the guard's
    meter of denials, whose elements come and go with traffic) or when egressd writes the same policy again
    (which of variant a or b holds it): equal to the listing egressd wrote."""

    def norm(v):
        if isinstance(v, dict):
            skip = ("handle", "elem") if v.get("name") == "denials" else ("handle",)
            return {k: 0 if k in ("packets", "bytes") else norm(x) for k, x in v.items() if k not in skip}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return re.sub(r"_[ab]$", "", v) if isinstance(v, str) else v

    def key(item):
        kind, obj = next(iter(item.items()))
        return kind, obj.get("chain", obj.get("name", ""))

    assert listing is not None, "no such table"
    return sorted(norm(listing), key=key)  # stable: the rules of a chain keep their order


def tenant_nft(world, ns, *args):
    """A change made inside the sandbox by another process, as a tenant holding CAP_NET_ADMIN would."""
    world.exec(ns, ["nft", *args])


def monitor_info(a):
    return a.agent_status()["monitor"]


def high_sockets(pid, world=None):
    """The descriptors at FD_BASE and above that are sockets; with world, only those that hear nftables
    events in one of its sandboxes: the change monitor's (the raw writer keeps a socket per namespace up
    there too, which listens to no group)."""
    listening = set()
    for sb in world.sandboxes if world is not None else ():
        for line in world.exec(sb.name, ["cat", "/proc/net/netlink"]).stdout.splitlines()[1:]:
            f = line.split()  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            if len(f) >= 10 and f[1] == "12" and int(f[3], 16):
                listening.add(f"socket:[{f[-1]}]")
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if int(fd) >= FD_BASE and link.startswith("socket:") and (world is None or link in listening):
                out.append(int(fd))
    return out


# --- the agent ----------------------------------------------------------------------------------------


def test_a_deleted_table_is_repaired_at_once_not_at_the_resync(world, agent):
    sb = world.sandboxes[0]
    a = agent(resync_interval=HOUR).start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    assert closed_to(sb.name, OK4)
    # Listening first: a deletion before that is repaired too (the check made once the socket listens),
    # but it could not be logged as a change seen.
    assert eventually(lambda: monitor_info(a)["watched"] == 1)
    written = as_written(nft_table(sb.name))
    for round_ in range(1, 4):  # again and again: each deletion is seen, none is left to the resync
        t0 = time.monotonic()
        tenant_nft(world, sb.name, "delete", "table", "inet", "egressd")
        a.wait_log("repaired", detail="table was deleted", count=round_, timeout=REPAIR_BOUND_S)
        assert time.monotonic() - t0 < REPAIR_BOUND_S
        assert as_written(nft_table(sb.name)) == written
        assert closed_to(sb.name, OK4)  # real packets: denied again after the repair
    changed = a.events("table_changed")
    assert len(changed) == 3 and all("(nft)" in e["detail"] for e in changed)
    assert a.agent_status()["reconciles"]["repaired"] == 3


def test_a_rule_added_and_a_set_element_removed_are_repaired(world, agent):
    sb = world.sandboxes[0]
    a = agent(resync_interval=HOUR).start()
    a.upsert("s0", sb.netns_path, 1, deny_out=[BAD4])
    assert a.wait("s0", 1)
    assert closed_to(sb.name, BAD4) and open_to(sb.name, OK4)
    written = as_written(nft_table(sb.name))

    tenant_nft(world, sb.name, "insert", "rule", "inet", "egressd", "output", "accept")
    a.wait_log("repaired", detail="table was altered in place", timeout=REPAIR_BOUND_S)
    assert eventually(lambda: closed_to(sb.name, BAD4))
    output = [
        r["rule"]["expr"]
        for r in nft_json(sb.name, "list", "chain", "inet", "egressd", "output")
        if "rule" in r
    ]
    assert output and [{"accept": None}] not in output
    assert as_written(nft_table(sb.name)) == written

    deny4 = live_name(sb.name, "deny4")
    tenant_nft(world, sb.name, "delete", "element", "inet", "egressd", deny4, "{", BAD4, "}")
    a.wait_log("repaired", detail="set deny4 holds other addresses than the policy's", timeout=REPAIR_BOUND_S)
    assert eventually(lambda: closed_to(sb.name, BAD4))
    elems = [i["set"].get("elem", []) for i in nft_json(sb.name, "list", "table", "inet", "egressd")
             if "set" in i and i["set"]["name"] == live_name(sb.name, "deny4")]  # fmt: skip
    assert elems == [[BAD4]]
    assert as_written(nft_table(sb.name)) == written


def test_the_agents_own_writes_cause_no_extra_reconciles(world, agent):
    sb = world.sandboxes[0]
    a = agent(resync_interval=HOUR).start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    # No check once the socket listens: the generation proves the agent's write the only commit since.
    assert eventually(lambda: monitor_info(a)["checks_spared"] == 1)
    for rev in range(2, 8):
        a.upsert("s0", sb.netns_path, rev, allow_internet_access=rev % 2 == 0, deny_out=[f"203.0.113.{rev}"])
        assert a.wait("s0", rev)
    time.sleep(0.5)  # events of the last write have long arrived by now
    reconciles = a.agent_status()["reconciles"]
    assert (reconciles["applied"], reconciles["unchanged"], reconciles["repaired"]) == (7, 0, 0)
    assert monitor_info(a)["triggers"] == 0 and monitor_info(a)["overflows"] == 0
    assert a.status()["s0"]["writes"] == 7
    assert not a.events("table_changed") and not a.events("repaired")


def test_changes_to_other_tables_of_the_sandbox_are_not_ours(world, agent):
    sb = world.sandboxes[0]
    a = agent(resync_interval=HOUR).start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    assert eventually(lambda: monitor_info(a)["checks_spared"] == 1)
    try:
        tenant_nft(world, sb.name, "add", "table", "inet", "tenant")
        tenant_nft(world, sb.name, "add", "chain", "inet", "tenant", "c")
        tenant_nft(world, sb.name, "add", "rule", "inet", "tenant", "c", "counter")
        time.sleep(0.5)
        assert monitor_info(a)["triggers"] == 0
        assert a.agent_status()["reconciles"]["unchanged"] == 0
    finally:
        world.exec(sb.name, ["nft", "delete", "table", "inet", "tenant"], check=False)


def test_with_watch_changes_off_only_the_resync_repairs(world, agent):
    sb = world.sandboxes[0]
    a = agent(resync_interval=HOUR, extra_config="watch_changes = false\n").start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1)
    assert monitor_info(a) is None and high_sockets(a.proc.pid, world) == []
    tenant_nft(world, sb.name, "delete", "table", "inet", "egressd")
    time.sleep(2.0)
    assert not has_table(sb.name) and open_to(sb.name, OK4)
    assert not a.events("repaired")


def test_monitor_sockets_sit_above_the_low_descriptors_and_go_with_their_sandbox(world, agent):
    s0, s1 = world.sandboxes
    a = agent(resync_interval=HOUR).start()
    assert high_sockets(a.proc.pid) == []
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False)
    a.upsert("s1", s1.netns_path, 1, allow_internet_access=False)
    assert a.wait("s0", 1) and a.wait("s1", 1)
    assert eventually(lambda: len(high_sockets(a.proc.pid, world)) == 2 and monitor_info(a)["watched"] == 2)
    a.send({"type": "delete", "id": "s0"})
    assert eventually(lambda: len(high_sockets(a.proc.pid, world)) == 1 and monitor_info(a)["watched"] == 1)
    written = as_written(nft_table(s1.name))
    tenant_nft(world, s1.name, "delete", "table", "inet", "egressd")
    a.wait_log("repaired", sandbox="s1", timeout=REPAIR_BOUND_S)
    assert as_written(nft_table(s1.name)) == written


def test_a_sandbox_moved_to_another_namespace_is_watched_there(world, agent):
    s0, s1 = world.sandboxes
    a = agent(resync_interval=HOUR).start()
    a.upsert("s", s0.netns_path, 1, allow_internet_access=False)
    assert a.wait("s", 1)
    a.upsert("s", s1.netns_path, 2, allow_internet_access=False)
    assert a.wait("s", 2)
    assert eventually(lambda: not has_table(s0.name) and monitor_info(a)["watched"] == 1)
    written = as_written(nft_table(s1.name))
    tenant_nft(world, s1.name, "delete", "table", "inet", "egressd")
    a.wait_log("repaired", sandbox="s", netns=s1.netns_path, timeout=REPAIR_BOUND_S)
    assert as_written(nft_table(s1.name)) == written
    assert closed_to(s1.name, OK4)


# --- ChangeMonitor in this process ------------------------------------------------------------------


async def until(check, timeout=REPAIR_BOUND_S):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class TimedCalls(list):
    """Calls with the moment each came: (sandbox id, time.monotonic())."""

    def append(self, sid):
        super().append((sid, time.monotonic()))


def run_monitor(scenario, check_on_watch=False, calls=None, **kw):
    """scenario(monitor, calls) on a fresh loop; calls collects the sandbox ids the monitor reported.
    The check made when a socket starts listening is off unless asked for: calls are then events only."""
    raise_fd_limit()

    async def main():
        got = [] if calls is None else calls
        m = ChangeMonitor(got.append, **{"min_gap": 0.0, **kw})
        m.check_on_watch = check_on_watch
        try:
            return await asyncio.wait_for(scenario(m, got), 30)
        finally:
            m.close()

    return asyncio.run(main())


def apply_in_this_process(backend, sb, **policy):
    record = parse_sandbox({"id": sb.name, "netns": sb.netns_path, "network_policy": policy})
    backend.apply(record.netns, render(record.policy, _config()))


def _config():
    from egressd.model.config import config_from_dict

    return config_from_dict({})


def test_commits_of_our_threads_are_ignored_and_others_reported_once(world, backend, enforce):
    sb = world.sandboxes[0]

    async def scenario(m, calls):
        assert m.own_filter, "this test runs in the initial pid namespace"
        m.watch("s", sb.netns_path)
        assert await until(lambda: m.info()["watched"] == 1)
        assert m._watches["s"].sock.fileno() >= FD_BASE
        for flavour in (False, True, False):  # our own writes, from a worker thread as the agent's are
            await asyncio.to_thread(apply_in_this_process, backend, sb, allow_internet_access=flavour)
        await asyncio.sleep(0.3)
        assert calls == []
        # One foreign transaction of many messages (it deletes every chain, set and rule): one call.
        await asyncio.to_thread(tenant_nft, world, sb.name, "delete", "table", "inet", "egressd")
        assert await until(lambda: calls == ["s"])
        await asyncio.sleep(0.3)
        assert calls == ["s"]

    run_monitor(scenario)


def test_a_forged_message_is_dropped_and_makes_the_sandbox_be_checked(world):
    sb = world.sandboxes[0]
    forged_newgen = struct.pack("=IHHII", 20, (10 << 8) | 15, 0, 0, 0) + b"\0\0\0\0"

    async def scenario(m, calls):
        m.watch("s", sb.netns_path)
        assert await until(lambda: m.info()["watched"] == 1)
        portid = m._watches["s"].sock.getsockname()[0]
        with netns_socket(sb.name, socket.AF_NETLINK, socket.SOCK_RAW, 12) as forger:
            forger.bind((0, 0))
            forger.sendto(forged_newgen, (portid, 0))
        assert await until(lambda: calls == ["s"])
        assert m.info()["spoofed"] == 1

    run_monitor(scenario, is_own=lambda tid: True)  # even with everything "ours", a forgery is checked


def test_sandboxes_over_capacity_wait_for_a_descriptor(world):
    s0, s1 = world.sandboxes

    async def scenario(m, calls):
        m.watch("a", s0.netns_path)
        m.watch("b", s1.netns_path)
        assert await until(lambda: m.info()["watched"] == 1)
        assert m.info()["waiting_for_descriptors"] == 1
        m.watch("a", None)
        assert await until(lambda: m.info()["watched"] == 1 and m.info()["waiting_for_descriptors"] == 0)
        await asyncio.to_thread(tenant_nft, world, s1.name, "add", "table", "inet", "egressd")
        try:
            assert await until(lambda: calls == ["b"])
        finally:
            await asyncio.to_thread(tenant_nft, world, s1.name, "delete", "table", "inet", "egressd")

    run_monitor(scenario, capacity=1)


def test_refresh_follows_a_path_that_names_another_namespace_now(world):
    s0, s1 = world.sandboxes
    path = f"/run/netns/{world.prefix}moved"
    open(path, "w").close()

    def bind(target):
        subprocess.run(["umount", path], capture_output=True, check=False)
        subprocess.run(["mount", "--bind", target, path], check=True)

    async def scenario(m, calls):
        bind(s0.netns_path)
        m.watch("s", path)
        assert await until(lambda: m.info()["watched"] == 1)
        bind(s1.netns_path)  # the sandbox's namespace was replaced under the same path
        m.refresh()
        assert await until(lambda: m.info()["watched"] == 1 and not m._watches["s"].opening)
        await asyncio.to_thread(tenant_nft, world, s1.name, "add", "table", "inet", "egressd")
        try:
            assert await until(lambda: "s" in calls)
        finally:
            await asyncio.to_thread(tenant_nft, world, s1.name, "delete", "table", "inet", "egressd")
        subprocess.run(["umount", path], check=True)  # gone: the socket lets go of the namespace
        m.refresh()
        assert m.info()["watched"] == 0

    try:
        run_monitor(scenario)
    finally:
        subprocess.run(["umount", "--lazy", path], capture_output=True, check=False)
        os.unlink(path)


def test_lost_events_make_the_sandbox_be_checked(world, backend, enforce):
    """A receive buffer too small for one big transaction: the kernel drops events (ENOBUFS). Even though
    the transaction was our own, the monitor cannot know that any more, so it reports the sandbox."""
    sb = world.sandboxes[0]
    tiny = lambda path: open_watch(path, FD_BASE, rcvbuf=4096)  # noqa: E731
    many = [f"198.18.{i // 250}.{i % 250}" for i in range(0, 4000, 2)]

    async def scenario(m, calls):
        m.watch("s", sb.netns_path)
        assert await until(lambda: m.info()["watched"] == 1)
        # On the loop thread, so nothing reads the socket while the kernel fills it: the loss is certain.
        apply_in_this_process(backend, sb, allow_out=many)
        assert await until(lambda: "s" in calls)  # once per wake-up that lost events: at least once
        assert m.info()["overflows"] >= 1

    run_monitor(scenario, opener=tiny)


def test_a_burst_of_changes_is_checked_at_most_once_per_gap(world, backend, enforce):
    """Sixteen transactions in a few milliseconds (counted as foreign here): one check at once, one more
    when min_gap has passed, and no more, however long a tenant keeps it up."""
    sb = world.sandboxes[0]

    def burst():
        for i in range(8):
            apply_in_this_process(backend, sb, allow_internet_access=i % 2 == 0)

    async def scenario(m, calls):
        m.watch("s", sb.netns_path)
        assert await until(lambda: m.info()["watched"] == 1)
        del calls[:]
        await asyncio.to_thread(burst)
        await asyncio.sleep(1.2)
        times = [t for _, t in calls]
        assert 2 <= len(times) <= 3, times
        assert all(b - a >= 0.45 for a, b in itertools.pairwise(times)), times  # min_gap 0.5

    run_monitor(scenario, calls=TimedCalls(), min_gap=0.5, is_own=lambda tid: False)


def test_a_new_watch_checks_once_for_changes_made_before_it_listened(world):
    sb = world.sandboxes[0]

    async def scenario(m, calls):
        m.watch("s", sb.netns_path)
        assert await until(lambda: calls == ["s"])
        await asyncio.sleep(0.2)
        assert calls == ["s"] and m.info()["watched"] == 1

    run_monitor(scenario, check_on_watch=True)


def test_a_new_watch_spares_its_check_only_when_the_one_commit_since_was_egressds(world, backend):
    """The agent's first write to a new namespace and the watch that follows: the check covering the gap
    is left out when the ruleset generation, read once the socket listens, is one above the generation
    read before the write; any other commit in between (here a tenant's table) and it is made."""
    sb = world.sandboxes[0]
    path = sb.netns_path

    async def scenario(m, calls):
        for sid, tenant in (("quiet", False), ("busy", True)):
            backend.remove(path)
            listing, before = backend.read_marked(path)
            assert listing is None and before is not None
            await asyncio.to_thread(apply_in_this_process, backend, sb, allow_internet_access=False)
            if tenant:
                tenant_nft(world, sb.name, "add", "table", "inet", "tenant")
            m.watch(sid, path, (netns_id(path), before))
            assert await until(lambda s=sid: m._watches[s].sock is not None)
            await asyncio.sleep(0.2)
        return m.info()

    try:
        calls = []
        info = run_monitor(scenario, check_on_watch=True, calls=calls)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            tenant_nft(world, sb.name, "delete", "table", "inet", "tenant")
        backend.remove(path)
    assert calls == ["busy"] and info["checks_spared"] == 1


def test_the_agents_own_namespace_is_never_watched(world):
    async def scenario(m, calls):
        m.watch("s", "/proc/1/ns/net")
        await asyncio.sleep(0.2)
        return m.info()

    info = run_monitor(scenario)
    assert info["watched"] == 0 and info["open_failures"] == 1
