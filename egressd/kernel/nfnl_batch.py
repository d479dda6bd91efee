"""egressd's nftables JSON commands sent as one nf_tables netlink batch, without libnftables (issue 19).

libnftables 1.0.6 loads every table of a namespace (and every element of every interval set) before each
write, so in the agent's namespace, which holds one host-side table per sandbox interface, a change costs
0.3-1.6 s at 1,000 tables; and a sandbox's own table costs 1.5-1.8 ms of libnftables per write, under the
process-wide lock every libnftables call takes. The kernel's part is well under a millisecond.
nfnl_encode.encode_batch turns the commands into the messages libnftables 1.0.6 sends for them; BatchSocket
sends the batch in a namespace and reads the answers (nfnl_elements.AckReader). The batch applies whole or
not at all, as a libnftables transaction does; a refusal names the command the kernel refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from egressd.kernel import nfnl
from egressd.kernel.backend import ApplyError
from egressd.kernel.netns import in_netns
from egressd.kernel.nfnl_elements import AckReader
from egressd.kernel.nfnl_encode import Batch, EncodeError, describe, encode_batch

__all__ = ["Batch", "BatchSocket", "EncodeError", "encode_batch"]

T = TypeVar("T")
SOL_NETLINK, NETLINK_CAP_ACK, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 270, 10, 32, 33
ACK_TRUESIZE = 2048  # what one acknowledgement may cost in the receive buffer (an skb), generously


def _refusals(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of every refusal in one datagram of answers (AckReader keeps only the
    first errno; this says which message it was, for the error)."""
    out: list[tuple[int, int]] = []
    with contextlib.suppress(nfnl.Unframed):  # what cannot be framed, AckReader reports
        for kind, _, seq, body in nfnl.frames(data):
            if kind == nfnl.NLMSG_ERROR and len(body) >= 4:
                code = -struct.unpack_from("=i", body)[0]
                if code:
                    out.append((seq, code))
    return out


class BatchSocket:
    """A NETLINK_NETFILTER socket kept for one namespace's batches, one batch at a time.

    Kept, like nfnl_elements.ElementSocket and for the same reasons (making one inside a namespace costs
    about 0.3 ms; closing one soon after a commit waits an RCU grace period)."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._sock = sock
        self._where = where
        self._lock = threading.Lock()
        self._seq = 0
        self._buffers = [0, 0]  # the send and receive buffer sizes asked for so far
        # An error's acknowledgement without the refused message in it: a refused batch of many elements
        # would otherwise fill the receive buffer with copies of itself.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)

    @classmethod
    def open(cls, path: str | None = None, setns: Callable[[int, int], int] | None = None) -> BatchSocket:
        """In the namespace at path (None: the agent's own). Raises NetnsError, or OSError."""
        if path is None:
            return cls(nfnl.netfilter_socket(), "egressd's own namespace")
        return cls(in_netns(path, nfnl.netfilter_socket, setns)[0], path)

    def _grow(self, which: int, size: int) -> None:
        """Buffers big enough for the batch and for every acknowledgement (a lost one would be a write
        whose outcome is unknown)."""
        if size > self._buffers[which]:
            force, plain = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))[which]
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, plain, size)
            self._buffers[which] = size

    def run(
        self, commands: list[Any], what: str = "transaction", plain_sets: Mapping[str, str] | None = None
    ) -> None:
        """The commands, in one transaction. Raises EncodeError (nothing was sent) or ApplyError."""
        with self._lock:
            begin = self._seq = 1 if self._seq > 0x7F000000 else self._seq + 1
            batch = encode_batch(commands, begin, plain_sets)
            self._seq = batch.acked[-1] + 1 if batch.acked else begin
            if not batch.acked:
                return
            reader, refused = AckReader(begin, batch.acked), []
            try:
                self._grow(0, len(batch.data) + nfnl.RECV_BUFFER)
                self._grow(1, len(batch.origin) * ACK_TRUESIZE + nfnl.RECV_BUFFER)  # a refusal each, at most
                self._sock.sendall(batch.data)
                while not reader.done:
                    data = self._recv(queued_only=bool(refused))
                    if data is None:
                        break  # refused, and nothing else queued: the kernel is done with the batch
                    reader.feed(data)
                    refused += [r for r in _refusals(data) if r[0] in batch.origin or r[0] == begin]
            except (OSError, ValueError) as e:  # timeout included
                raise ApplyError(f"the {what} could not be written in {self._where}: {e}") from None
        if reader.error or refused:
            seq, code = min(refused, default=(begin, reader.error))
            i = batch.origin.get(seq)
            at = "" if i is None else f" (command {i}: {describe(commands[i])})"
            raise ApplyError(f"the kernel refused the {what} in {self._where}: {os.strerror(code)}{at}")

    def ask(self, question: Callable[[socket.socket, int], T], seqs: int = 1) -> T:
        """question(the socket, its first sequence number) between batches, with `seqs` sequence numbers
        of its own; replies to anything else must be skipped (a refused batch may leave some queued).
        Raises NetlinkError."""
        with self._lock:
            first = self._seq = 1 if self._seq > 0x7F000000 else self._seq + 1
            self._seq += seqs - 1
            try:
                return question(self._sock, first)
            except OSError as e:
                raise nfnl.NetlinkError(f"a read in {self._where} failed: {e}") from None

    def _recv(self, queued_only: bool) -> bytes | None:
        """The next datagram of answers. The kernel processes a batch within sendmsg and queues every
        answer before it returns: after a refusal the rest is read without waiting (None: nothing left),
        as the last message's acknowledgement is not sent when the kernel stops at a malformed message."""
        if not queued_only:
            data = self._sock.recv(nfnl.RECV_BUFFER)
        else:
            timeout = self._sock.gettimeout()
            self._sock.settimeout(0)
            try:
                data = self._sock.recv(nfnl.RECV_BUFFER)
            except BlockingIOError:
                return None
            finally:
                self._sock.settimeout(timeout)
        if not data:
            raise OSError(errno.ECONNRESET, "netlink socket closed")
        return data

    def close(self) -> None:
        with self._lock:
            self._sock.close()

    def __del__(self) -> None:
        """A socket nobody holds any more is closed (a cache lets go of it so: nfnl_sandbox.py)."""
        with contextlib.suppress(OSError, AttributeError):
            self._sock.close()
