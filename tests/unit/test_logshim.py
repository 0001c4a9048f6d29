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


def _start(tmp_path: Path, cap: int) -> subprocess.Popen[bytes]:
    shim = subprocess.Popen([sys.executable, "-m", "mvm._logshim", str(tmp_path), str(cap)], cwd=tmp_path)
    deadline = time.monotonic() + 10
    while not ((tmp_path / "con.sock").exists() and (tmp_path / "ev.sock").exists()):
        assert time.monotonic() < deadline and shim.poll() is None
        time.sleep(0.01)
    return shim


def _connect(tmp_path: Path, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(tmp_path / name))
    return s


def test_a_flood_stays_within_the_cap_and_says_what_was_dropped(tmp_path: Path) -> None:
    cap = 400_000
    shim = _start(tmp_path, cap)
    con, ev = _connect(tmp_path, "con.sock"), _connect(tmp_path, "ev.sock")
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
    assert not (tmp_path / "con.sock").exists() and not (tmp_path / "ev.sock").exists()
    lines = [ln.text for ln in logs.stream(files)]
    assert any("bytes of older events output dropped (log cap)" in t for t in lines)
    assert any("bytes of older console output dropped" in t for t in lines)
    assert lines[-1].endswith("x | n19999")  # the newest survive, in order, whole
    events = logs.read_events(files)
    ts = [e["t"] for e in events if e.get("kind") == "log"]
    assert ts == sorted(ts) and ts[-1] == 19999


def test_follow_reads_across_a_rotation(tmp_path: Path) -> None:
    shim = _start(tmp_path, 40_000)
    ev = _connect(tmp_path, "ev.sock")
    con = _connect(tmp_path, "con.sock")
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


def test_a_shim_nobody_connects_to_goes_away(tmp_path: Path) -> None:
    env = {**os.environ}
    shim = subprocess.Popen([sys.executable, "-c", "import mvm._logshim as m; m.CONNECT_TIMEOUT = 0.5; "
                             f"raise SystemExit(m.serve({str(tmp_path)!r}, 100000))"], cwd=tmp_path, env=env)
    assert shim.wait(10) == 0
    assert not list(tmp_path.glob("*.sock"))
