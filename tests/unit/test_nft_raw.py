"""LibnftBackend's choice of writer, without root or a kernel: raw netlink first (kernel/nfnl_sandbox.py),
libnftables for what the encoder does not know or when no socket can be made, and never for a refusal."""

import logging

import pytest

from egressd.kernel.backend import ApplyError
from egressd.kernel.netns import NetnsError
from egressd.kernel.nfnl_encode import EncodeError
from egressd.kernel.nft import LibnftBackend

TABLE_CMD = [{"add": {"table": {"family": "inet", "name": "egressd"}}}]


class Sockets:
    """Stands in for SandboxSockets: raises what it is told to, records what it wrote."""

    def __init__(self, raises: Exception | None = None) -> None:
        self.raises = raises
        self.runs: list[tuple[str, str]] = []
        self.dropped: list[str] = []

    def run(self, netns, commands, what):
        if self.raises is not None:
            raise self.raises
        self.runs.append((netns, what))

    def ident(self, netns):
        return None

    def drop(self, netns):
        self.dropped.append(netns)

    def close(self):
        pass


@pytest.fixture
def backend():
    b = LibnftBackend(raw=True)
    b.libnft_calls = []

    def cmd(netns, cmd):
        b.libnft_calls.append((netns, cmd))
        return 0, "", ""

    b._cmd = cmd
    yield b
    b.close()


def test_raw_is_the_default_and_raw_false_writes_through_libnftables():
    on, off = LibnftBackend(), LibnftBackend(raw=False)
    assert on._sockets is not None and off._sockets is None
    on.close()
    off.close()


def test_a_write_goes_over_raw_netlink(backend):
    backend._sockets = Sockets()
    backend.run("/run/netns/x", TABLE_CMD, "table")
    assert backend._sockets.runs == [("/run/netns/x", "table")] and backend.libnft_calls == []


@pytest.mark.parametrize(
    ("error", "event"),
    [
        (EncodeError("command 3 (add rule inet egressd c): unsupported statement {'log': 1}"), "unencodable"),
        (OSError(24, "Too many open files"), "socket_failed"),
    ],
)
def test_what_raw_netlink_cannot_write_goes_through_libnftables_logged_once(backend, caplog, error, event):
    backend._sockets = Sockets(raises=error)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            backend.run("/run/netns/x", TABLE_CMD, "table")
    assert len(backend.libnft_calls) == 3
    assert sum(event in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "error", [ApplyError("the kernel refused the table: File exists"), NetnsError("p", "gone", True)]
)
def test_a_refusal_or_an_unusable_namespace_is_not_written_again_with_libnftables(backend, error):
    backend._sockets = Sockets(raises=error)
    with pytest.raises(type(error)):
        backend.run("/run/netns/x", TABLE_CMD, "table")
    assert backend.libnft_calls == []


def test_removing_a_table_that_is_not_there_says_so(backend):
    backend._sockets = Sockets(
        raises=ApplyError("the kernel refused the deletion: No such file or directory")
    )
    assert backend.remove("/run/netns/x") is False
    backend._sockets = Sockets()
    assert backend.remove("/run/netns/x") is True


def test_forgetting_a_namespace_lets_go_of_its_socket(backend):
    backend._sockets = Sockets()
    backend.forget("/run/netns/x")
    assert backend._sockets.dropped == ["/run/netns/x"]
