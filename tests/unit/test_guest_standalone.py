"""Standalone guests (no mvm host): kernel command line settings, console event lines."""

from __future__ import annotations

import os
import time

import pytest

from mvm.guest import cmdline, net
from mvm.guest.events import EventLog, format_console
from mvm.guest.init import standalone_runtime


def test_cmdline_split_follows_the_kernel_quoting() -> None:
    text = 'console=ttyS0 root=/dev/vda  mvm.env.GREETING="hello world" "mvm.hostname=web-1" quiet\n'
    assert cmdline.split(text) == ["console=ttyS0", "root=/dev/vda", "mvm.env.GREETING=hello world",
                                   "mvm.hostname=web-1", "quiet"]


def test_cmdline_settings() -> None:
    args = cmdline.split('quiet mvm.standalone=1 mvm.hostname=web-1 mvm.env.PORT=8080 mvm.env.EMPTY= '
                         'mvm.env.bad-name=x mvm.unknown=1 env.PORT=1')
    assert cmdline.settings(args) == {"standalone": True, "template": False, "vm": "web-1",
                                      "env": {"PORT": "8080", "EMPTY": ""}}
    assert cmdline.settings(["mvm.standalone=0"])["standalone"] is False
    assert cmdline.settings(["mvm.standalone"])["standalone"] is True
    assert cmdline.settings([]) == {"standalone": False, "template": False, "vm": None, "env": {}}
    assert cmdline.settings(["mvm.template=1"])["template"] is True


def test_standalone_runtime_has_what_the_config_disk_would() -> None:
    assert standalone_runtime({"standalone": True, "vm": "web-1", "env": {"A": "1"}}) == {
        "vm": "web-1", "env": {"A": "1"}}
    assert standalone_runtime({"standalone": True, "vm": None, "env": {}}) == {"env": {}}


def test_cmdline_read_tolerates_a_missing_file(tmp_path: os.PathLike[str]) -> None:
    assert cmdline.read(os.path.join(tmp_path, "absent")) == []


@pytest.mark.parametrize(
    ("event", "line"),
    [
        ({"t": 0.25, "kind": "log", "svc": "hello", "stream": "stderr", "line": '"GET / HTTP/1.1" 200 -'},
         '00:00:00.250 hello | "GET / HTTP/1.1" 200 -'),
        ({"t": 61.0, "kind": "log", "svc": "hello", "stream": "preStart:stdout", "line": "seeding"},
         "00:01:01.000 hello preStart:stdout | seeding"),
        ({"t": 1.0, "kind": "service", "svc": "hello", "state": "running", "pid": 42, "restarts": 0},
         "00:00:01.000 [service hello] running (pid 42)"),
        ({"t": 2.0, "kind": "health", "check": "hello", "state": "unhealthy", "exit": 7,
          "output": "curl: (7) Failed\nto connect"},
         "00:00:02.000 [health hello] unhealthy (exit 7): curl: (7) Failed / to connect"),
        ({"t": 3.0, "kind": "health", "check": "hello", "state": "healthy", "exit": 0, "output": ""},
         "00:00:03.000 [health hello] healthy (exit 0)"),
        ({"t": 4.0, "kind": "init", "msg": "ready"}, "00:00:04.000 [init] ready"),
        ({"kind": "log", "svc": "x", "line": "\x1b[31mred\x1b[0m\r"}, "--:--:--.--- x | ?[31mred?[0m?"),
    ],
)
def test_console_lines_are_readable_single_lines(event: dict[str, object], line: str) -> None:
    assert format_console(event) == line


def test_unknown_events_are_not_shown_on_the_console() -> None:
    assert format_console({"t": 1.0, "kind": "metrics"}) is None


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_standalone_event_log_writes_readable_lines_to_the_console_only() -> None:
    console_r, console_w = os.pipe()
    try:
        events = EventLog(None, console=console_w)
        events.log("hello", "stdout", "Serving HTTP on 0.0.0.0 port 8080")
        events.emit("health", check="hello", state="healthy", exit=0, output="")
        events.flush()
        lines = _read_all(console_r).decode().splitlines()
    finally:
        os.close(console_r)
        os.close(console_w)
    assert len(lines) == 2
    assert lines[0].endswith(" hello | Serving HTTP on 0.0.0.0 port 8080")
    assert lines[1].endswith(" [health hello] healthy (exit 0)")
    assert not any(line.startswith("{") for line in lines)  # no JSON on the console


def test_event_port_still_gets_json_when_a_console_is_given(tmp_path: os.PathLike[str]) -> None:
    port = os.path.join(tmp_path, "events.log")
    open(port, "w").close()
    console_r, console_w = os.pipe()
    try:
        events = EventLog(port, console=console_w)
        events.emit("init", msg="ready")
        events.flush()
        time.sleep(0.01)
        console = _read_all(console_r).decode()
    finally:
        os.close(console_r)
        os.close(console_w)
    with open(port) as f:
        assert '"msg":"ready"' in f.read()
    assert console.endswith("[init] ready\n")


def test_resolv_conf_with_and_without_search_domains() -> None:
    assert net.resolv_conf(["10.0.2.3"], []) == "nameserver 10.0.2.3\n"  # what `mvmctl up` guests get
    assert net.resolv_conf(["10.96.0.10", "a", "b", "c"], ["default.svc.cluster.local", "svc.cluster.local"]) == (
        "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver a\nnameserver b\n")
