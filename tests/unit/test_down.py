"""`down`'s grace for services, and what it tells about a stop (logic; the e2e suite stops real VMs)."""

import inspect
import json
import socket
from pathlib import Path
from typing import Any

from mvm._api.down import SHUTDOWN_MARGIN, SHUTDOWN_TIMEOUT, stop_grace
from mvm.cli.commands.down import down as down_command
from mvm.guest import protocol
from mvm.paths import VMFiles
from mvm.runtime.logs import services_killed_at_stop


def test_services_get_the_timeout_less_the_margin() -> None:
    assert stop_grace(SHUTDOWN_TIMEOUT) == SHUTDOWN_TIMEOUT - SHUTDOWN_MARGIN == 10.0  # docker stop's default
    assert stop_grace(60) == 55 and stop_grace(2) == 0.0
    assert stop_grace(10**9) == protocol.MAX_STOP_GRACE


def test_the_cli_default_is_the_apis() -> None:
    default = inspect.signature(down_command).parameters["timeout"].default
    assert default == SHUTDOWN_TIMEOUT


def test_the_services_killed_by_the_last_stop_are_named(tmp_path: Path) -> None:
    files = VMFiles(tmp_path)
    events = [
        {"kind": "init", "msg": "shutting down"},
        {"kind": "init", "msg": "stop: service old did not end within 5s of SIGTERM: killed", "service": "old"},
        {"kind": "init", "msg": "ready"},
        {"kind": "init", "msg": "shutting down", "grace": 10.0},
        {"kind": "service", "svc": "web", "state": "stopped", "exit": -9},
        {"kind": "init", "msg": "stop: service web did not end within 10s of SIGTERM: killed", "service": "web"},
        {"kind": "init", "msg": "stop: service db did not end within 10s of SIGTERM: killed", "service": "db"},
        {"kind": "init", "msg": "powering off"},
    ]
    files.events_log.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert services_killed_at_stop(files) == ["web", "db"]


def test_the_guest_refuses_a_grace_that_is_not_seconds() -> None:
    from mvm.guest.control import ControlServer
    from mvm.guest.execstream import Connection

    asked: list[float] = []
    server = ControlServer([], reaper=None, status=dict, shutdown=asked.append,  # type: ignore[arg-type]
                           configure=lambda c: None, env_overrides={}, path="/bin", signals=None)  # type: ignore[arg-type]
    host, guest = socket.socketpair()
    with host, guest:
        conn = Connection(guest.fileno())
        replies: list[dict[str, Any]] = []
        for grace in ('"ten"', "-1", "true", "1e9"):
            server._dispatch(conn, f'{{"op": "shutdown", "id": 1, "grace": {grace}}}'.encode())
            replies.append(protocol.decode(host.recv(65536)))
        assert all(r["ok"] is False and "grace" in r["error"] for r in replies) and asked == []
        server._dispatch(conn, b'{"op": "shutdown", "id": 2, "grace": 2.5}')
        assert protocol.decode(host.recv(65536))["ok"] is True
        server._dispatch(conn, b'{"op": "shutdown", "id": 3}')  # an older host: the guest's own default
        assert protocol.decode(host.recv(65536))["ok"] is True
    import time

    deadline = time.monotonic() + 5
    while len(asked) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(asked) == [2.5, protocol.STOP_GRACE]
