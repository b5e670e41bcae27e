"""The systemd notify protocol against real datagram sockets."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.service.sdnotify import Notifier


def _receive_all(sock: socket.socket) -> list[bytes]:
    received: list[bytes] = []
    sock.setblocking(False)
    while True:
        try:
            received.append(sock.recv(4096))
        except BlockingIOError:
            return received


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "n.sock"
    if len(str(path)) >= 100:  # sun_path holds 108 bytes
        pytest.skip(f"tmp_path too long for an AF_UNIX socket: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_messages_arrive_in_order_and_exactly(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("draining 3 targets")
        assert notifier.status("2 rows pending")
        assert notifier.watchdog()
        assert notifier.stopping()
    assert _receive_all(sock) == [
        b"READY=1\nSTATUS=draining 3 targets",
        b"STATUS=2 rows pending",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_status_cannot_inject_other_assignments(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        notifier.status("line one\nREADY=1")
    assert _receive_all(sock) == [b"STATUS=line one READY=1"]


def test_abstract_socket() -> None:
    name = f"relay-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.enabled
            assert notifier.ready("up")
            assert notifier.watchdog()
        assert _receive_all(sock) == [b"READY=1\nSTATUS=up", b"WATCHDOG=1"]
    finally:
        sock.close()


def test_disabled_notifier_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object, **kwargs: object) -> None:
        raise AssertionError("a disabled notifier must not open a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    notifier.close()


@pytest.mark.parametrize("value", ["", "@", "relative/path", "vsock:2:1234"])
def test_unusable_socket_values_disable(value: str) -> None:
    assert not Notifier({"NOTIFY_SOCKET": value}).enabled


def test_missing_socket_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="relay.sdnotify"):
        assert notifier.ready("up") is False
        assert notifier.watchdog() is False
    failures = [r for r in caplog.records if r.name == "relay.sdnotify"]
    assert len(failures) == 2
    assert all(r.levelno == logging.DEBUG for r in failures)


def test_recovers_once_the_socket_appears(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    assert notifier.status("before") is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        assert notifier.status("after") is True
        assert _receive_all(sock) == [b"STATUS=after"]
    finally:
        notifier.close()
        sock.close()


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    assert Notifier({"WATCHDOG_USEC": "1000"}).watchdog_interval() == 0.0005


def test_watchdog_interval_checks_the_pid() -> None:
    env = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval() == 10.0
    env_other = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env_other).watchdog_interval() is None
    assert Notifier(env_other, pid=os.getpid() + 1).watchdog_interval() == 10.0


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "me"},
    ],
)
def test_watchdog_off(env: dict[str, str]) -> None:
    assert Notifier(env).watchdog_interval() is None
