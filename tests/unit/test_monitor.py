"""The change monitor's decoder: which nftables events make a sandbox be checked, and which do not. No root.

Messages are built byte by byte the way the kernel lays them out (nlmsghdr, nfgenmsg, attributes), so
these tests pin the constants as well as the logic.
"""

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.kernel.monitor import ChangeMonitor
from egressd.kernel.monitor_events import TransactionParser
from egressd.kernel.monitor_socket import fd_capacity
from egressd.kernel.netns import NetnsError
from egressd.model.config import ConfigError, config_from_dict

OWN_TID = 4242
OTHER_TID = 777


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def msg(kind: int, attrs: bytes = b"", family: int = 1, subsys: int = 10) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs  # nfgenmsg: family, version, res_id
    length = 16 + len(body)
    return struct.pack("=IHHII", length, (subsys << 8) | kind, 0, 1, 0) + body + b"\0" * (-length % 4)


def table_msg(kind: int, table: bytes = b"egressd") -> bytes:
    """NEWTABLE/DELTABLE carry NFTA_TABLE_NAME (1); chains, rules, sets, elements carry the table in 1 too."""
    return msg(kind, attr(1, table + b"\0") + attr(2, b"x\0"))


def newgen(pid: int | None, name: bytes = b"nft") -> bytes:
    attrs = attr(1, struct.pack(">I", 9))  # NFTA_GEN_ID
    if pid is not None:
        attrs += attr(2, struct.pack(">I", pid))  # NFTA_GEN_PROC_PID, big-endian
    return msg(15, attrs + attr(3, name + b"\0"), family=0)  # NFT_MSG_NEWGEN, AF_UNSPEC


NEWTABLE, DELTABLE, NEWCHAIN, NEWRULE, DELRULE, NEWSET, NEWSETELEM, DELSETELEM = 0, 2, 3, 6, 8, 9, 12, 14


def parser() -> TransactionParser:
    return TransactionParser(is_own=lambda tid: tid == OWN_TID)


@pytest.mark.parametrize(
    "kind", [NEWTABLE, DELTABLE, NEWCHAIN, NEWRULE, DELRULE, NEWSET, NEWSETELEM, DELSETELEM]
)
def test_a_foreign_change_to_our_table_triggers_once_per_transaction(kind):
    p = parser()
    reason = p.feed(table_msg(kind) + table_msg(kind) + newgen(OTHER_TID, b"nft"))
    assert reason is not None and "pid 777 (nft)" in reason
    assert p.feed(newgen(OTHER_TID)) is None  # an empty transaction afterwards changes nothing


def test_our_own_transactions_trigger_nothing():
    p = parser()
    assert p.feed(table_msg(NEWTABLE) + table_msg(NEWSETELEM) + newgen(OWN_TID, b"python")) is None


def test_other_tables_of_the_sandbox_are_not_ours_to_watch():
    p = parser()
    assert (
        p.feed(table_msg(NEWTABLE, b"filter") + table_msg(NEWRULE, b"egressd_x") + newgen(OTHER_TID)) is None
    )
    assert p.feed(table_msg(DELTABLE, b"egressd2") + newgen(OTHER_TID)) is None


def test_a_transaction_split_over_datagrams_is_judged_at_its_newgen():
    p = parser()
    assert p.feed(table_msg(DELRULE)) is None
    assert p.feed(table_msg(NEWRULE, b"other")) is None
    assert p.feed(newgen(OTHER_TID)) is not None


def test_our_transaction_then_a_foreign_one_in_the_same_datagram():
    p = parser()
    data = table_msg(NEWRULE) + newgen(OWN_TID) + table_msg(DELTABLE) + newgen(OTHER_TID)
    assert "pid 777" in p.feed(data)
    data = table_msg(DELTABLE) + newgen(OTHER_TID) + table_msg(NEWRULE) + newgen(OWN_TID)
    assert "pid 777" in p.feed(data)


def test_a_newgen_without_a_pid_is_foreign():
    assert parser().feed(table_msg(DELTABLE) + newgen(None)) is not None


def test_without_an_own_thread_test_every_change_counts():
    """Outside the initial pid namespace the ids cannot be compared: our own writes cost a read each."""
    assert TransactionParser(is_own=None).feed(table_msg(NEWRULE) + newgen(OWN_TID)) is not None


def test_a_message_without_a_table_name_or_of_an_unknown_kind_counts_when_foreign():
    p = parser()
    assert p.feed(msg(NEWRULE, attr(2, b"output\0")) + newgen(OTHER_TID)) is not None
    assert p.feed(msg(30, attr(1, b"filter\0")) + newgen(OTHER_TID)) is not None  # a kind newer than us
    assert p.feed(msg(30) + newgen(OWN_TID)) is None


def test_attribute_flags_are_masked_off_the_type():
    nested_table = struct.pack("=HH", 12, 0x8000 | 1) + b"egressd\0"
    assert parser().feed(msg(NEWSETELEM, nested_table) + newgen(OTHER_TID)) is not None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(table_msg(NEWRULE)[:10], id="truncated header"),
        pytest.param(table_msg(NEWRULE)[:30], id="length beyond the datagram"),
        pytest.param(struct.pack("=IHHII", 8, 0xA06, 0, 0, 0), id="length below the header"),
        pytest.param(struct.pack("=IHHII", 18, 0xA06, 0, 0, 0) + b"\1\0", id="no nfgenmsg"),
        pytest.param(msg(NEWRULE, struct.pack("=HH", 50, 1) + b"egressd\0"), id="attribute too long"),
        pytest.param(msg(NEWRULE, struct.pack("=HH", 2, 1) + b"ab"), id="attribute too short"),
        pytest.param(msg(15, struct.pack("=HH", 40, 2)), id="broken newgen"),
        pytest.param(msg(0, subsys=2), id="another netfilter subsystem"),
        pytest.param(struct.pack("=IHHII", 16, 2, 0, 0, 0), id="netlink error message"),
        pytest.param(b"garbage!", id="garbage"),
    ],
)
def test_anything_malformed_or_unexpected_triggers_at_once(data):
    assert parser().feed(data) is not None


def test_after_garbage_the_parser_starts_clean():
    p = parser()
    assert p.feed(table_msg(DELTABLE)[:20]) is not None
    assert p.feed(newgen(OWN_TID)) is None
    assert p.feed(table_msg(DELTABLE) + newgen(OTHER_TID)) is not None


def test_reset_forgets_a_half_seen_transaction():
    """After lost events (ENOBUFS) the monitor triggers anyway and starts over."""
    p = parser()
    assert p.feed(table_msg(DELTABLE)) is None
    p.reset()
    assert p.feed(newgen(OTHER_TID)) is None


def test_noop_messages_and_empty_datagrams_are_ignored():
    noop = struct.pack("=IHHII", 16, 1, 0, 0, 0)
    assert parser().feed(noop + b"") is None
    assert parser().feed(b"") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data):
    p = parser()
    p.feed(data)
    p.feed(table_msg(DELTABLE) + newgen(OTHER_TID))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["ours", "foreign", "other-table"]), min_size=1, max_size=8))
def test_only_transactions_with_a_foreign_change_to_our_table_trigger(transactions):
    p = parser()
    data = b""
    for t in transactions:
        if t == "ours":
            data += table_msg(NEWRULE) + newgen(OWN_TID)
        elif t == "foreign":
            data += table_msg(DELRULE) + newgen(OTHER_TID)
        else:
            data += table_msg(DELRULE, b"nat") + newgen(OTHER_TID)
    assert (p.feed(data) is not None) == ("foreign" in transactions)


def test_descriptor_capacity_leaves_the_low_descriptors_and_some_headroom():
    assert fd_capacity(1024) == 0
    assert fd_capacity(1000) == 0
    assert fd_capacity(4096) == 4096 - 1024 - 64
    assert fd_capacity(524288) > 500_000


def test_a_namespace_that_cannot_be_opened_is_logged_and_left_to_the_resync(caplog):
    def opener(path):
        raise NetnsError(path, "does not exist (yet)", gone=True)

    async def main():
        m = ChangeMonitor(lambda sid: None, capacity=10, is_own=lambda tid: False, opener=opener)
        m.watch("a", "/run/netns/a")
        await asyncio.sleep(0.05)
        info = m.info()
        m.refresh()  # tried again, quietly
        await asyncio.sleep(0.05)
        m.watch("a", None)
        m.close()
        return info

    with caplog.at_level("INFO", logger="egressd"):
        info = asyncio.run(main())
    assert info["watched"] == 0 and info["open_failures"] == 1
    assert [r.getMessage() for r in caplog.records].count("watch_failed") == 1


def test_sandboxes_beyond_the_descriptor_capacity_wait_and_are_logged_once(caplog):
    opened = []

    def opener(path):
        opened.append(path)
        raise NetnsError(path, "gone", gone=True)  # no real socket: only the bookkeeping is looked at

    async def main():
        m = ChangeMonitor(lambda sid: None, capacity=0, is_own=lambda tid: False, opener=opener)
        for sid in "abc":
            m.watch(sid, f"/run/netns/{sid}")
        await asyncio.sleep(0.05)
        info = m.info()
        m.close()
        return info

    with caplog.at_level("INFO", logger="egressd"):
        info = asyncio.run(main())
    assert opened == [] and info["waiting_for_descriptors"] == 3
    assert [r.getMessage() for r in caplog.records].count("monitor_full") == 1


def test_watch_changes_is_on_by_default_and_strictly_boolean():
    assert config_from_dict({}).watch_changes is True
    assert config_from_dict({"reconcile": {"watch_changes": False}}).watch_changes is False
    for bad in ("false", 0):
        with pytest.raises(ConfigError, match=r"reconcile\.watch_changes"):
            config_from_dict({"reconcile": {"watch_changes": bad}}, "egressd.toml")


def test_while_paused_watches_are_recorded_and_made_on_resume():
    """The agent's first pass records every table to watch; the sockets are made after READY, all of them,
    before the verification pass reads every table."""
    import socket as socket_

    opened = []

    def opener(path):
        opened.append(path)
        a, b = socket_.socketpair()
        b.close()
        return a, None, None

    async def main():
        m = ChangeMonitor(lambda sid: None, capacity=10, is_own=lambda tid: False, opener=opener)
        m.paused = True
        for sid in "abc":
            m.watch(sid, f"/run/netns/{sid}")
        m.watch("c", None)  # gone again before READY: never opened
        await asyncio.sleep(0.05)
        assert opened == [] and m.info()["watched"] == 0
        m.resume()
        assert await m.settled(5)
        info = m.info()
        m.close()
        return info

    info = asyncio.run(main())
    assert sorted(opened) == ["/run/netns/a", "/run/netns/b"] and info["watched"] == 2


@pytest.mark.parametrize(
    ("since", "found", "checked"),
    [
        (("ns-a", 41), ("ns-a", 42), False),  # one generation on, same namespace: only egressd's write
        (("ns-a", 0xFFFFFFFF), ("ns-a", 0), False),  # the 32-bit generation wraps
        (("ns-a", 41), ("ns-a", 43), True),  # another commit besides egressd's
        (("ns-a", 41), ("ns-a", 41), True),  # not even egressd's write: someone deleted, re-made, ...
        (("ns-a", 41), ("ns-b", 42), True),  # another namespace at the path now
        (("ns-a", 41), ("ns-a", None), True),  # the generation could not be read
        (None, ("ns-a", 42), True),  # no proof given
    ],
)
def test_the_first_check_of_a_watch_is_spared_only_when_the_generation_proves_no_other_commit(
    since, found, checked
):
    """A new sandbox's watch starts after its table was written: the check that covers that gap is left
    out only when the namespace is the one written to and exactly one commit (egressd's) happened since."""
    import socket as socket_

    triggered = []

    def opener(path):
        a, b = socket_.socketpair()
        b.close()
        return a, found[0], found[1]

    async def main():
        m = ChangeMonitor(triggered.append, capacity=10, is_own=lambda tid: False, opener=opener, min_gap=0)
        m.watch("a", "/run/netns/a", since)
        assert await m.settled(5)
        await asyncio.sleep(0.05)
        info = m.info()
        m.close()
        return info

    info = asyncio.run(main())
    assert triggered == (["a"] if checked else [])
    assert info["checks_spared"] == (0 if checked else 1) and info["watched"] == 1


def test_kept_sockets_move_above_the_descriptors_libnftables_needs():
    import resource
    import socket

    from egressd.common.fds import move_high

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    low = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    low.bind(("127.0.0.1", 0))
    port = low.getsockname()[1]
    if soft > 1100:
        with move_high(low, 1024) as high:
            assert high.fileno() >= 1024 and high.getsockname()[1] == port and high.gettimeout() == 0.0
        assert low.fileno() == -1  # the low one is closed
    # No descriptor can reach the base under the soft limit: the socket stays where it is, usable.
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with move_high(other, soft + 10) as same:
        assert same is other and same.fileno() < soft


def test_logged_packets_go_to_the_denials_and_a_failing_report_never_costs_a_repair():
    """The watch's socket hears the log group too: a log datagram goes to `packets`, never to the
    transaction parser; if `packets` raises, a tamper event read in the same wake still triggers."""
    import os

    from tests.unit.test_nflog import ipv4, log_msg, udp

    triggered, handed = [], []
    rfd, wfd = os.pipe()

    class FakeNetlink:  # what the kernel would have queued on the watch's socket
        def __init__(self):
            self.queue = []

        def fileno(self):
            return rfd

        def setblocking(self, flag):
            pass

        def recvfrom_into(self, buf, size, flags):
            if not self.queue:
                raise BlockingIOError
            data = self.queue.pop(0)
            buf[: len(data)] = data
            return len(data), (0, 0)  # port 0: from the kernel

        def close(self):
            pass

    sock = FakeNetlink()

    def packets(sid, got, malformed):
        handed.append((sid, [p.prefix for p in got]))
        raise RuntimeError("the denials are broken")

    async def main():
        m = ChangeMonitor(triggered.append, capacity=10, is_own=lambda tid: False, min_gap=0,
                          opener=lambda path: (sock, ("dev", 1), None), packets=packets)  # fmt: skip
        m.check_on_watch = False
        m.watch("a", "/run/netns/a")
        assert await m.settled(5)
        sock.queue = [log_msg(ipv4(17, udp(53))), table_msg(DELTABLE) + newgen(OTHER_TID)]
        os.write(wfd, b"x")  # readable
        await asyncio.sleep(0.1)
        m.close()

    asyncio.run(main())
    os.close(rfd)
    os.close(wfd)
    assert handed == [("a", ["deny_out"])]
    assert triggered == ["a"]  # the deletion after it was still seen


def test_log_datagrams_beyond_a_sandboxs_budget_are_not_read(monkeypatch):
    """A tenant's own logging rules are not rate-limited: past LOG_DATAGRAMS_PER_S a second the datagrams
    are dropped unparsed and counted."""
    from egressd.kernel import monitor as mon
    from egressd.kernel.monitor import MonitorStats, _hand_over, _Watch
    from tests.unit.test_nflog import ipv4, log_msg, udp

    monkeypatch.setattr(mon.time, "monotonic", lambda: 5.0)  # all within one second
    handed, stats = [], MonitorStats()
    w = _Watch("/run/netns/a", parser())
    view = memoryview(log_msg(ipv4(17, udp(53))))
    for _ in range(mon.LOG_DATAGRAMS_PER_S + 7):
        _hand_over(lambda sid, got, bad: handed.append(len(got)), "a", w, view, stats)
    assert len(handed) == mon.LOG_DATAGRAMS_PER_S and stats.logs_dropped == 7
    monkeypatch.setattr(mon.time, "monotonic", lambda: 6.0)  # the next second: read again
    _hand_over(lambda sid, got, bad: handed.append(len(got)), "a", w, view, stats)
    assert len(handed) == mon.LOG_DATAGRAMS_PER_S + 1
