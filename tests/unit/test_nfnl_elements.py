"""The learned-address batch over raw netlink (nfnl_elements.py), from bytes built here: no root, no kernel."""

import errno
import ipaddress
import struct

from egressd.kernel.nfnl import (
    NFGENMSG,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFPROTO_NETDEV,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLMSG_ERROR,
    NLMSGHDR,
    attributes,
)
from egressd.kernel.nfnl_elements import (
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_ELEM_TIMEOUT,
    AckReader,
    learn_batch,
)

SETS = ("learned4", "learned6")


def messages(batch: bytes) -> list[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, body) of each message of a batch."""
    out, off, view = [], 0, memoryview(batch)
    while off < len(view):
        length, kind, flags, seq, _ = NLMSGHDR.unpack_from(view, off)
        out.append((kind, flags, seq, view[off + NLMSGHDR.size : off + length]))
        off += (length + 3) & ~3
    return out


def elements(body: memoryview) -> list[tuple[str, int | None]]:
    """(address, timeout in ms or None) of a set element message."""
    top = attributes(body[NFGENMSG.size :], (NFTA_SET_ELEM_LIST_ELEMENTS,))
    out, off, data = [], 0, top[NFTA_SET_ELEM_LIST_ELEMENTS]
    while off < len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        assert kind & 0x3FFF == NFTA_LIST_ELEM and kind & 0x8000  # nested
        elem = attributes(data[off + 4 : off + length], (NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT))
        key = attributes(elem[NFTA_SET_ELEM_KEY], (NFTA_DATA_VALUE,))[NFTA_DATA_VALUE]
        timeout = elem.get(NFTA_SET_ELEM_TIMEOUT)
        out.append(
            (
                str(ipaddress.ip_address(bytes(key))),
                None if timeout is None else struct.unpack("!Q", timeout)[0],
            )
        )
        off += (length + 3) & ~3
    return out


def ack(seq: int, code: int = 0) -> bytes:
    body = struct.pack("=i", -code) + NLMSGHDR.pack(16, 0, 0, seq, 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), NLMSG_ERROR, 0, seq, 0) + body


def test_one_transaction_add_delete_add_per_family_with_timeouts_in_ms():
    batch, acked = learn_batch(
        "inet", "egressd", SETS, {"192.0.2.7": 30, "2001:db8::1": 5, "192.0.2.1": 60}, 100
    )
    msgs = messages(batch)
    assert [m[0] for m in (msgs[0], msgs[-1])] == [NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END]
    # the batch markers name the nf_tables subsystem, big-endian
    assert bytes(msgs[0][3][2:4]) == struct.pack("!H", 10) and msgs[0][2] == 100
    body = msgs[1:-1]
    assert [m[0] & 0xFF for m in body] == [NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM] * 2
    assert acked == [m[2] for m in body] == list(range(101, 107))
    for kind, flags, _, _ in body:
        assert flags & NLM_F_ACK
        assert bool(flags & NLM_F_CREATE) == (kind & 0xFF == NFT_MSG_NEWSETELEM)
    v4 = [elements(m[3]) for m in body[:3]]
    assert v4[0] == v4[2] == [("192.0.2.1", 60_000), ("192.0.2.7", 30_000)]
    assert v4[1] == [("192.0.2.1", None), ("192.0.2.7", None)]  # a delete names keys only
    assert elements(body[3][3]) == [("2001:db8::1", 5_000)]
    names = attributes(body[0][3][NFGENMSG.size :], (NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET))
    assert bytes(names[NFTA_SET_ELEM_LIST_TABLE]) == b"egressd\0"
    assert bytes(names[NFTA_SET_ELEM_LIST_SET]) == b"learned4\0"
    assert bytes(
        attributes(body[3][3][NFGENMSG.size :], (NFTA_SET_ELEM_LIST_SET,))[NFTA_SET_ELEM_LIST_SET]
    ) == (b"learned6\0")


def test_a_family_without_addresses_sends_nothing_for_its_set_and_netdev_is_named():
    batch, acked = learn_batch("netdev", "egressd_i1", SETS, {"2001:db8::9": 1}, 1)
    msgs = messages(batch)
    assert len(msgs) == 5 and len(acked) == 3
    assert all(NFGENMSG.unpack_from(m[3])[0] == NFPROTO_NETDEV for m in msgs[1:-1])


def test_done_only_when_every_message_is_acknowledged_in_any_datagrams():
    r = AckReader(10, [11, 12, 13])
    r.feed(ack(11) + ack(99))  # a stray answer to an older batch is ignored
    assert not r.done
    r.feed(ack(13) + ack(12))
    assert r.done and r.error == 0


def test_the_first_refusal_is_kept_and_a_refused_batch_ends_the_wait():
    r = AckReader(10, [11, 12])
    r.feed(ack(11, errno.ENOENT) + ack(12, 0))
    assert r.done and r.error == errno.ENOENT
    whole = AckReader(10, [11, 12])  # the commit failed: one error, on the batch's begin marker
    whole.feed(ack(10, errno.ENOMEM))
    assert whole.done and whole.error == errno.ENOMEM


def test_a_dump_of_learned_elements_reads_addresses_and_seconds_left():
    from egressd.kernel.nfnl import NFNL_SUBSYS_NFTABLES, NLMSG_DONE, attr
    from egressd.kernel.nfnl_elements import NFTA_SET_ELEM_EXPIRATION, ElementReader, getsetelem_request

    request = getsetelem_request("inet", "egressd", "learned4", 5)
    _, kind, flags, seq, _ = NLMSGHDR.unpack_from(request)
    assert kind & 0xFF == 13 and flags & 0x300 == 0x300 and seq == 5  # GETSETELEM, a dump

    def elem(addr, ms):
        key = attr(NFTA_SET_ELEM_KEY | 0x8000, attr(NFTA_DATA_VALUE, ipaddress.ip_address(addr).packed))
        return attr(NFTA_LIST_ELEM | 0x8000, key + attr(NFTA_SET_ELEM_EXPIRATION, struct.pack("!Q", ms)))

    body = NFGENMSG.pack(1, 0, 0) + attr(
        NFTA_SET_ELEM_LIST_ELEMENTS | 0x8000, elem("192.0.2.1", 29_500) + elem("2001:db8::1", 5)
    )
    msg = (
        NLMSGHDR.pack(NLMSGHDR.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM, 0, 5, 0)
        + body
    )
    done = NLMSGHDR.pack(20, NLMSG_DONE, 0, 5, 0) + b"\0" * 4
    r = ElementReader(5)
    r.feed(msg.replace(struct.pack("=I", 5), struct.pack("=I", 4), 1))  # an older reply: not this dump's
    assert r.left == {}
    r.feed(msg)
    assert not r.done
    r.feed(done)
    assert r.done and not r.missing and r.left == {"192.0.2.1": 29, "2001:db8::1": 0}
    gone = ElementReader(5)
    gone.feed(ack(5, errno.ENOENT))
    assert gone.done and gone.missing and gone.left == {}
