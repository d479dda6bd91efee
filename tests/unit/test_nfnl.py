"""Parsing of nf_tables dump replies (nfnl.py), from bytes built here: no root, no kernel."""

import errno
import struct

import pytest

from egressd.kernel.nfnl import (
    NFGENMSG,
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_GETRULE,
    NFT_MSG_NEWRULE,
    NFTA_RULE_CHAIN,
    NFTA_RULE_TABLE,
    NFTA_RULE_USERDATA,
    NLM_F_DUMP,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    DumpParser,
    NetlinkError,
    Unframed,
    attr,
    attributes,
    frames,
    getrule_dump_request,
    rule_comment,
)


def msg(kind: int, body: bytes, seq: int = 7) -> bytes:
    raw = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, 0, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def rule(comment: bytes | None, other_udata: bytes = b"") -> bytes:
    body = NFGENMSG.pack(1, 0, 0) + attr(NFTA_RULE_TABLE, b"egressd\0")
    if comment is not None or other_udata:
        udata = other_udata + (bytes([0, len(comment)]) + comment if comment is not None else b"")
        body += attr(NFTA_RULE_USERDATA, udata)
    return msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE, body)


def test_the_request_names_table_and_chain_and_asks_for_a_dump():
    req = getrule_dump_request("egressd", "fingerprint", seq=42)
    length, kind, flags, seq, _ = NLMSGHDR.unpack_from(req)
    assert length == len(req) and kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE
    assert flags & NLM_F_DUMP == NLM_F_DUMP and seq == 42
    attrs = attributes(memoryview(req)[NLMSGHDR.size + NFGENMSG.size :], (NFTA_RULE_TABLE, NFTA_RULE_CHAIN))
    assert bytes(attrs[NFTA_RULE_TABLE]) == b"egressd\0" and bytes(attrs[NFTA_RULE_CHAIN]) == b"fingerprint\0"


def test_comments_in_order_across_datagrams_until_done():
    p = DumpParser(seq=7)
    p.feed(rule(b"egressd/1 sha256:ab\0") + rule(None))
    assert not p.done
    p.feed(rule(b"second\0", other_udata=bytes([1, 4]) + b"\x01\x00\x00\x00") + msg(NLMSG_DONE, b"\0\0\0\0"))
    assert p.done and not p.missing
    assert p.comments == ["egressd/1 sha256:ab", None, "second"]


def test_enoent_means_missing_and_other_errors_raise():
    p = DumpParser(seq=7)
    p.feed(msg(NLMSG_ERROR, struct.pack("=i", -errno.ENOENT) + b"\0" * 16))
    assert p.done and p.missing
    with pytest.raises(NetlinkError, match="refused"):
        DumpParser(seq=7).feed(msg(NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + b"\0" * 16))


@pytest.mark.parametrize(
    "data, problem",
    [
        (msg(0x10 << 8, b"\0" * 4), "unexpected message type"),
        (rule(b"x\0")[:-6], "length"),
        (msg(NLMSG_DONE, b"\0\0\0\0", seq=8), "another request"),
        (
            msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE, NFGENMSG.pack(1, 0, 0) + b"\x40\x00\x07\x00"),
            "length",
        ),
        (b"\x01\x02", "truncated"),
    ],
)
def test_anything_unexpected_is_an_error_never_a_fingerprint(data, problem):
    with pytest.raises(NetlinkError, match=problem):
        DumpParser(seq=7).feed(data)


def test_a_truncated_comment_record_is_malformed():
    with pytest.raises(ValueError):
        rule_comment(memoryview(bytes([0, 10]) + b"abc"))
    assert rule_comment(memoryview(bytes([1, 1, 9]))) is None


def test_frames_walks_every_message_with_its_padding():
    data = msg(0x0A10, b"abc", seq=1) + msg(NLMSG_DONE, b"", seq=2) + msg(0x0A0F, b"\1\2\3\4", seq=3)
    got = [(kind, seq, bytes(body)) for kind, _, seq, body in frames(memoryview(bytearray(data)))]
    assert got == [(0x0A10, 1, b"abc"), (NLMSG_DONE, 2, b""), (0x0A0F, 3, b"\1\2\3\4")]
    assert list(frames(b"")) == []


@pytest.mark.parametrize(
    "tail, problem",
    [
        (b"\x10\x00\x00", "truncated"),  # not even a header
        (NLMSGHDR.pack(8, NLMSG_DONE, 0, 9, 0), "length 8"),  # below the header's own size
        (NLMSGHDR.pack(64, NLMSG_DONE, 0, 9, 0) + b"\0" * 8, "length 64"),  # beyond the datagram
    ],
)
def test_frames_yields_what_it_can_frame_then_says_why_it_stopped(tail, problem):
    """Every reader keeps its own policy for the rest (an error, None, a count): the walk only frames."""
    messages = frames(msg(NLMSG_DONE, b"", seq=1) + tail)
    assert next(messages)[2] == 1
    with pytest.raises(Unframed, match=problem):
        next(messages)
