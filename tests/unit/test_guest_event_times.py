"""A boot's first events wait for the host to set the guest's clock, then go out with exact times."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mvm.guest import events as events_mod
from mvm.guest.events import EventLog


class Clocks:
    """A guest's two clocks: the wall clock starts 0.7 s behind the host's (the RTC's whole
    seconds) until the host sets it; the monotonic one counts from boot."""

    def __init__(self) -> None:
        self.up = 2.0
        self.offset = -0.7  # guest wall clock minus the host's

    def host(self) -> float:
        return 1_800_000_000.0 + self.up

    def wall(self) -> float:
        return self.host() + self.offset

    def monotonic(self) -> float:
        return self.up


def held_log(tmp_path: Path, hold: float, clocks: Clocks) -> tuple[Path, EventLog]:
    """An event port (a file) and a log on it that holds its events up to ``hold`` s."""
    port = tmp_path / "events.log"
    port.touch()
    return port, EventLog(str(port), hold=hold, wall=clocks.wall, monotonic=clocks.monotonic)


def written(port: Path, log: EventLog) -> list[dict[str, object]]:
    log.flush()
    return [json.loads(line) for line in port.read_text().splitlines()]


def test_held_events_get_the_hosts_time_once_it_sets_the_clock(tmp_path: Path) -> None:
    clocks = Clocks()
    port, log = held_log(tmp_path, 60.0, clocks)
    log.emit("init", msg="services started")
    clocks.up += 0.5
    log.emit("service", svc="web", state="running")
    time.sleep(0.05)
    assert port.read_text() == ""  # held: their times would be 0.7 s early
    clocks.up += 0.3
    clocks.offset = 0.0  # the host's ping sets the clock ...
    log.clock_exact()  # ... and says so
    clocks.up += 0.1
    log.emit("init", msg="later")
    lines = written(port, log)
    assert [e.get("msg") or e.get("state") for e in lines] == ["services started", "running", "later"]
    assert [e["t"] for e in lines] == [1_800_000_002.0, 1_800_000_002.5, 1_800_000_002.9]
    assert [e["up"] for e in lines] == [2.0, 2.5, 2.9]


def test_without_the_host_held_events_go_out_as_they_are_after_the_hold(tmp_path: Path) -> None:
    clocks = Clocks()
    port, log = held_log(tmp_path, 0.2, clocks)
    log.emit("init", msg="services started")
    time.sleep(0.05)
    assert port.read_text() == ""
    time.sleep(0.4)  # the hold ends without a ping (a host that never pings)
    assert json.loads(port.read_text())["t"] == round(1_800_000_002.0 - 0.7, 3)
    log.clock_exact()  # a ping after that changes nothing already written
    log.emit("init", msg="later")
    assert [e["msg"] for e in written(port, log)] == ["services started", "later"]


def test_a_boot_flood_of_output_is_not_held_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_mod, "CLOCK_HOLD_BYTES", 3 * 140)
    port = tmp_path / "events.log"
    port.touch()
    log = EventLog(str(port), hold=60.0)
    for i in range(5):
        log.log("web", "stdout", f"line {i}")
    assert [e["line"] for e in written(port, log)] == [f"line {i}" for i in range(5)]  # in order, none lost


def test_a_stop_before_the_ping_sends_what_was_held(tmp_path: Path) -> None:
    port = tmp_path / "events.log"
    port.touch()
    log = EventLog(str(port), hold=60.0)
    log.emit("init", msg="services started")
    log.emit("init", msg="powering off")
    assert [e["msg"] for e in written(port, log)] == ["services started", "powering off"]


def test_a_host_that_stops_reading_costs_bounded_memory_and_the_drop_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's log shim killed: the port's writer blocked, and every line the services
    printed piled up in PID 1 until the guest hung (2 MB/s, hands-on)."""
    import fcntl
    import os

    monkeypatch.setattr(events_mod, "QUEUE_LIMIT", 64 * 1024)
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: the port's buffer fills at once
    try:
        log = EventLog(f"/proc/self/fd/{w}")
        for i in range(5000):  # ~700 KB of output, with nobody reading
            log.log("web", "stdout", f"line {i:05d} " + "x" * 60)
            assert log._queued <= 64 * 1024  # bounded: the rest is dropped
        got, ends = b"", 0
        os.set_blocking(r, False)
        deadline = time.monotonic() + 10
        while b'"end"' not in got and time.monotonic() < deadline:  # the host reads again
            log.log("web", "stdout", "end")
            ends += 1
            try:
                got += os.read(r, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
        events = [json.loads(x) for x in got.splitlines() if x]
    finally:
        os.close(r)
        os.close(w)
    notes = [e["msg"] for e in events if e["kind"] == "init"]
    assert notes and all(" log lines and events dropped: more than 0 MiB of them waited for the host" in n
                         for n in notes)
    kept = [e["line"] for e in events if e["kind"] == "log" and e["line"].startswith("line ")]
    assert kept == sorted(kept) and kept[0].startswith("line 00000")  # in order, the first ones kept
    dropped = sum(int(n.split()[0]) for n in notes)
    assert 5000 <= len(kept) + dropped <= 5000 + ends  # every line written or counted (an "end" may be dropped)
    assert len(kept) < 1000
