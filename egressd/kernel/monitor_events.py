"""What one namespace's nftables events mean: did a committed transaction touch table `egressd`, and was
it committed by someone other than this process.

Kept apart from the monitor's sockets and event loop so that the decoding is pure (bytes in, a reason to
check or None out) and is tested byte by byte without root (tests/unit/test_monitor.py). When unsure it
says check: lost state, truncated or malformed messages, and message kinds it does not know all trigger.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from egressd.kernel.nfnl import (
    NFGENMSG,
    NFNL_SUBSYS_NFTABLES,
    NLMSG_MIN_TYPE,
    NLMSG_NOOP,
    Unframed,
    attributes,
    frames,
)

# nf_tables constants, checked against linux/netfilter/nfnetlink.h and linux/netfilter/nf_tables.h (and
# against this kernel: see tests/integration/test_monitor.py).
# enum nf_tables_msg_types
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELFLOWTABLE = 24
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFT_MSG_TRACE = 17
# enum nft_gen_attributes
NFTA_GEN_PROC_PID = 2  # be32: task_pid_nr(current), the committing thread's id in the initial pid namespace
NFTA_GEN_PROC_NAME = 3  # the committing thread's comm
# In every object message from NEWTABLE to DELFLOWTABLE, attribute 1 names the table: NFTA_TABLE_NAME,
# NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE,
# NFTA_FLOWTABLE_TABLE.
NFTA_TABLE_ATTR = 1
PROC_PID_INIT_INO = 0xEFFFFFFC  # inode of the initial pid namespace (include/linux/proc_ns.h)

TABLE = b"egressd"


class TransactionParser:
    """Turns the event stream of one namespace into "check this sandbox" decisions, one per transaction.

    Messages of a transaction come in order, ended by NEWGEN; the parser remembers whether the messages
    since the last NEWGEN touched table `egressd` (or could have: unknown kinds, missing names), and at
    NEWGEN decides on the committer. State carries over between datagrams.
    """

    def __init__(self, is_own: Callable[[int], bool] | None = None, table: bytes = TABLE) -> None:
        self._is_own = is_own
        self._table = table
        self.touched = False

    def reset(self) -> None:
        """Events were lost: what was collected so far says nothing."""
        self.touched = False

    def feed(self, data: bytes | bytearray | memoryview) -> str | None:
        """Consume one datagram; return why the sandbox must be checked, or None when it need not be."""
        reason: str | None = None
        messages = frames(data)
        while True:
            try:
                kind, _, _, body = next(messages)
            except StopIteration:
                return reason
            except Unframed as e:
                self.reset()
                return reason or f"malformed event: {e}"
            if kind == NLMSG_NOOP:
                continue
            if kind < NLMSG_MIN_TYPE or kind >> 8 != NFNL_SUBSYS_NFTABLES:
                self.reset()
                reason = reason or f"unexpected netlink message type {kind:#x}"
                continue
            if len(body) < NFGENMSG.size:
                self.reset()
                return reason or "malformed event: no nfgenmsg header"
            msg = kind & 0xFF
            if msg != NFT_MSG_NEWGEN and (self.touched or msg in (NFT_MSG_GETGEN, NFT_MSG_TRACE)):
                continue  # the common case, cheap: the transaction already matters (or this changes nothing)
            attrs_view = body[NFGENMSG.size :]
            if msg == NFT_MSG_NEWGEN:
                try:
                    attrs = attributes(attrs_view, (NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME))
                except ValueError as e:
                    self.reset()
                    return reason or f"malformed event: {e}"
                touched, self.touched = self.touched, False
                if not touched:
                    continue
                pid = _be32(attrs.get(NFTA_GEN_PROC_PID))
                if pid is not None and self._is_own is not None and self._is_own(pid):
                    continue
                name = _text(attrs.get(NFTA_GEN_PROC_NAME))
                reason = reason or f"table changed by pid {pid if pid is not None else '?'} ({name or '?'})"
                continue
            if msg > NFT_MSG_DELFLOWTABLE:
                self.touched = True  # a kind newer than this module: cannot tell, so it matters
                continue
            try:
                table = attributes(attrs_view, (NFTA_TABLE_ATTR,)).get(NFTA_TABLE_ATTR)
            except ValueError as e:
                self.reset()
                return reason or f"malformed event: {e}"
            if table is None or bytes(table).rstrip(b"\0") == self._table:
                self.touched = True


def _be32(value: memoryview | None) -> int | None:
    if value is None or len(value) != 4:
        return None
    return int.from_bytes(value, "big")


def _text(value: memoryview | None) -> str | None:
    if value is None:
        return None
    return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")


def own_thread_check() -> Callable[[int], bool] | None:
    """A test for "this thread id is one of ours", or None when NEWGEN's ids cannot be compared with ours.

    The kernel reports the committing thread's id in the initial pid namespace. Our /proc/self/task lists
    ours in our own pid namespace: the two agree only when that is the initial one. Elsewhere (an agent in
    a container's pid namespace) every transaction counts as foreign: our own writes then each cost one
    extra read, never a missed change.
    """
    try:
        if os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO:
            return None
        if os.readlink("/proc/self") != str(os.getpid()):
            return None  # a /proc of another pid namespace
    except OSError:
        return None
    return lambda tid: os.path.exists(f"/proc/self/task/{tid}")
