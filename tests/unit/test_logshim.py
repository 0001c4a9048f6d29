"""The log shim and the log readers across its rotations (real sockets and files, no VM)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mvm.paths import VMFiles
from mvm.runtime import logs


def _start(tmp_path: Path, cap: int) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket]:
    """The shim with the other ends of a console and an events stream, as QEMU has them."""
    con, con_peer = socket.socketpair()
    ev, ev_peer = socket.socketpair()
    fds = [con_peer.fileno(), ev_peer.fileno()]
    shim = subprocess.Popen([sys.executable, "-m", "mvm._logshim", str(tmp_path), str(cap), *map(str, fds)],
                            cwd=tmp_path, pass_fds=fds)
    con_peer.close()
    ev_peer.close()
    return shim, con, ev


def test_a_flood_stays_within_the_cap_and_says_what_was_dropped(tmp_path: Path) -> None:
    cap = 400_000
    shim, con, ev = _start(tmp_path, cap)
    for i in range(20_000):  # ~1.3 MB of events, far beyond the cap
        ev.sendall(json.dumps({"t": i, "kind": "log", "svc": "x", "stream": "stdout", "line": f"n{i}"}).encode()
                   + b"\n")
    con.sendall(b"boot line\n" * 50_000)
    con.close()
    ev.close()
    assert shim.wait(10) == 0
    files = VMFiles(tmp_path)
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir() if f.name.startswith(("console", "events")))
    assert on_disk <= cap * 1.05, on_disk
    lines = [ln.text for ln in logs.stream(files)]
    assert any("bytes of older events output dropped (log cap" in t for t in lines)
    # each rotation drops one older file; the marker also says how much went in all (hands-on:
    # after 20 MB, it said only one rotation's 393216 bytes)
    totals = [int(t.split("; ")[1].split()[0]) for t in lines if "bytes in all)" in t and "events output" in t]
    assert totals and totals[-1] > 1_000_000 - cap, totals
    assert any("bytes of older console output dropped" in t for t in lines)
    assert lines[-1].endswith("x | n19999")  # the newest survive, in order, whole
    events = logs.read_events(files)
    ts = [e["t"] for e in events if e.get("kind") == "log"]
    assert ts == sorted(ts) and ts[-1] == 19999


def test_follow_reads_across_a_rotation(tmp_path: Path) -> None:
    shim, con, ev = _start(tmp_path, 40_000)
    follower = logs.stream(VMFiles(tmp_path), console=False, follow=True, poll=0.01)
    seen: list[str] = []
    for i in range(3000):
        ev.sendall(json.dumps({"t": i, "kind": "log", "svc": "x", "line": f"n{i}"}).encode() + b"\n")
        if i % 50 == 0:
            time.sleep(0.02)
            while True:  # read what is there (the stream only blocks when there is nothing)
                try:
                    line = next(follower)
                except StopIteration:
                    break
                seen.append(line.text)
                if line.text.endswith(f"n{i}"):
                    break
    numbers = [int(t.rsplit("n", 1)[1]) for t in seen if " | n" in t]
    assert numbers == sorted(numbers) and numbers[-1] >= 2950
    ev.close()
    con.close()
    assert shim.wait(10) == 0


def test_the_shim_ends_with_its_streams_and_leaves_the_vm_dir(tmp_path: Path) -> None:
    shim, con, ev = _start(tmp_path, 100_000)
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{shim.pid}/cwd") != "/":  # mvm finds a VM's QEMU by its cwd
        assert time.monotonic() < deadline
        time.sleep(0.01)
    con.close()
    ev.close()  # QEMU ended (or never started): the shim goes
    assert shim.wait(10) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "events.log"]


def test_readers_join_the_rotated_part_and_the_live_log(tmp_path: Path) -> None:
    """`logs -n`, `status`'s service tail and the bounded readers see one log across the two
    files the shim keeps, the older part first; a line too long to keep is left out with a note."""
    files = VMFiles(tmp_path)

    def event(i: int, line: str = "") -> bytes:
        return json.dumps({"t": i, "kind": "log", "svc": "x", "line": line or f"n{i}"}).encode() + b"\n"

    logs.rotated_path(files.events_log).write_bytes(b"".join(event(i) for i in range(0, 50)))
    files.events_log.write_bytes(event(50, "y" * (logs.LINE_LIMIT + 1)) + b"".join(event(i) for i in range(51, 60)))
    shown = [ln.text for ln in logs.stream(files, console=False)]
    numbers = [int(t.rsplit("n", 1)[1]) for t in shown if " | n" in t]
    assert numbers == [*range(0, 50), *range(51, 60)]
    assert any("longer than 256 KiB was left out" in t for t in shown)
    assert [ln.text.rsplit(" ", 1)[1] for ln in logs.stream(files, console=False, lines=3)] == ["n57", "n58", "n59"]
    assert logs.read_events(files)[0]["t"] == 0  # the whole of both parts fits the default tail
    files.events_log.write_bytes(b"".join(event(i) for i in range(50, 60)))
    tail = [e["t"] for e in logs.read_events(files, tail=len(event(59)) * 15 - 5)]  # a cut first line
    assert tail == list(range(46, 60))  # from the rotated part on, whole lines only


def test_a_service_a_signal_ended_is_shown_with_the_signal_name() -> None:
    def shown(exit: object) -> str:
        line = logs.format_event({"t": 0, "kind": "service", "svc": "web", "state": "backoff", "exit": exit,
                                  "delay": 0.5})
        assert line is not None
        return line.text.split("] ", 1)[1]

    assert shown(-9) == "backoff (killed by SIGKILL, delay 0.5)"
    assert shown(-63) == "backoff (killed by signal 63, delay 0.5)"
    assert shown(3) == "backoff (exit 3, delay 0.5)"
    assert shown("x") == "backoff (exit x, delay 0.5)"  # the guest's value, whatever its type
