"""Listening sockets: only a stale socket is ever replaced; planted files, symlinks and live sockets are not."""

import os
import socket
import stat

import pytest

from egressd.common.sockets import SocketPathError, bind_unix, unlink_if_ours


def test_a_new_socket_is_born_private(tmp_path):
    sock, ident = bind_unix(str(tmp_path / "run" / "s.sock"))
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "run" / "s.sock").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    finally:
        sock.close()
        unlink_if_ours(str(tmp_path / "run" / "s.sock"), ident)
    assert not (tmp_path / "run" / "s.sock").exists()


def test_a_planted_symlink_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "s.sock").symlink_to(target)
    with pytest.raises(SocketPathError, match="is a symlink, not a socket"):
        bind_unix(str(tmp_path / "s.sock"))
    assert (tmp_path / "s.sock").is_symlink() and target.read_text() == "keep me"


def test_a_live_socket_is_not_stolen_but_a_stale_one_is_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen()
    with pytest.raises(SocketPathError, match="another process is already listening"):
        bind_unix(path)
    live.close()  # now stale: the file is there, nobody listens
    sock, _ = bind_unix(path)
    sock.close()
