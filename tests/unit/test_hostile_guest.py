"""Guest data is untrusted input (issue 11, item 3): every host parser of guest bytes has
bounds, and nothing a guest sends makes the host raise anything but a known MvmError.

The control channel is driven by a fake agent on a real unix socket that sends what a hostile
guest would: deeply nested JSON, endless lines, floods of foreign messages, wrong types,
terminal escapes. The event log is written by hand with the same."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mvm._api.copy import BoundedTarInfo
from mvm._api.models import GuestStatus
from mvm._untrusted import printable
from mvm.errors import AgentError, UsageError
from mvm.guest import protocol
from mvm.paths import VMFiles
from mvm.runtime import agent, logs

DEEP = b"[" * 200_000 + b"]" * 200_000


# --- the wire format ----------------------------------------------------------------------


def test_decode_refuses_deep_nesting_without_recursion_error() -> None:
    for line in (DEEP, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"[" * 100_000):
        with pytest.raises(ValueError, match="nested"):
            protocol.decode(line)
    ok = b'{"a":' + b"[" * 31 + b"]" * 31 + b"}"
    assert isinstance(protocol.decode(ok)["a"], list)
    with pytest.raises(ValueError, match="nested deeper than 32"):
        protocol.decode(b'{"a":' + b"[" * 32 + b"]" * 32 + b"}")
    # brackets inside strings do not count, escaped quotes included
    text = json.dumps({"line": "[" * 5000 + '\\"{' * 3000}).encode()
    assert protocol.decode(text)["line"].startswith("[[[")


def test_line_buffer_bounds_a_line_and_skips_its_rest() -> None:
    buf = protocol.LineBuffer(limit=1000)
    assert buf.feed(b"a" * 600) == []
    with pytest.raises(ValueError, match="longer than 1000"):
        buf.feed(b"b" * 600)
    assert buf.feed(b"c" * 5000) == []  # still the same line: skipped, not buffered
    assert buf.feed(b"tail\n{\"ok\":1}\n") == [b'{"ok":1}']  # its tail is never taken for a line
    with pytest.raises(ValueError):
        buf.feed(b"x" * 2000 + b"\n")  # a complete line that is too long
    assert buf.feed(b"y\n") == [b"y"]


# --- the agent client, against a hostile fake agent ------------------------------------------


@pytest.fixture()
def files(tmp_path: Path) -> VMFiles:
    files = VMFiles(tmp_path / "vm")
    files.root.mkdir()
    return files


def _agent(files: VMFiles, behave: Callable[[socket.socket, dict[str, object]], None]) -> Iterator[None]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(files.control(0)))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\n" not in data.lstrip(b"\n"):  # (a client starts with a newline: mvm.runtime.agent)
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data.strip():
                    try:
                        behave(conn, json.loads(data.lstrip(b"\n").split(b"\n")[0]))
                    except OSError:
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    server.close()


@pytest.fixture()
def hostile(files: VMFiles) -> Iterator[Callable[[Callable[[socket.socket, dict[str, object]], None]], None]]:
    stops: list[Iterator[None]] = []

    def start(behave: Callable[[socket.socket, dict[str, object]], None]) -> None:
        gen = _agent(files, behave)
        next(gen)
        stops.append(gen)

    yield start
    for gen in stops:
        next(gen, None)


def test_nesting_and_stale_replies_are_skipped(files: VMFiles, hostile: Callable[..., None]) -> None:
    def behave(conn: socket.socket, req: dict[str, object]) -> None:
        conn.sendall(DEEP + b"\n" + b'{"id":"other","ok":true}\n' + b"not json\n" + b"[1]\n"
                     + protocol.encode({"id": req["id"], "ok": True, "pong": 1.5}))

    hostile(behave)
    assert agent.request(files, "vm", "ping", timeout=5)["pong"] == 1.5


def test_an_endless_line_ends_the_session(files: VMFiles, hostile: Callable[..., None]) -> None:
    def behave(conn: socket.socket, req: dict[str, object]) -> None:
        chunk = b"x" * 65536
        for _ in range(64):  # 4 MiB without a newline
            conn.sendall(chunk)

    hostile(behave)
    tracemalloc.start()  # the peak of this request alone (ru_maxrss is the process's lifetime peak)
    try:
        with pytest.raises(AgentError, match="line longer than 1048576"):
            agent.request(files, "vm", "status", timeout=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, f"{peak} bytes held for a 4 MiB line cut at 1 MiB"


def test_a_flood_of_foreign_messages_ends_the_session(files: VMFiles, hostile: Callable[..., None]) -> None:
    def behave(conn: socket.socket, req: dict[str, object]) -> None:
        line = b'{"id":"nope","event":"stdout","data":""}\n' * 1000
        while True:
            conn.sendall(line)

    hostile(behave)
    with agent.AgentSession(files, "vm") as session:
        session.start("exec", argv=["true"])
        started = time.monotonic()
        with pytest.raises(AgentError, match="not replies to this request"):
            list(session.events())  # no timeout on a stream: the flood itself ends it
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("event", [
    {"event": "stdout", "data": "%%% not base64"},
    {"event": "stdout", "data": {"x": 1}},
    {"event": ["stdout"], "data": ""},
    {"event": "stdin", "data": ""},
])
def test_malformed_output_events(files: VMFiles, hostile: Callable[..., None], event: dict[str, object]) -> None:
    hostile(lambda conn, req: conn.sendall(protocol.encode({**event, "id": req["id"]})))
    with agent.AgentSession(files, "vm") as session:
        session.start("exec", argv=["true"])
        with pytest.raises(AgentError, match="malformed output event|not base64"):
            list(session.events())


def test_a_final_reply_of_wrong_types_is_still_a_final_reply(files: VMFiles, hostile: Callable[..., None]) -> None:
    reply = {"ok": "yes", "exit": "zero", "error": "\x1b]0;owned\x07" + "e" * 10_000, "timed_out": 1}
    hostile(lambda conn, req: conn.sendall(protocol.encode({**reply, "id": req["id"]})))
    with agent.AgentSession(files, "vm") as session:
        session.start("exec", argv=["true"])
        (final,) = list(session.events())
    assert isinstance(final, agent.Final)
    assert (final.ok, final.exit, final.timed_out) == (False, 1, False)
    assert "\x1b" not in final.error and "\\x1b" in final.error and len(final.error) < 2100


def test_a_refusal_is_printable(files: VMFiles, hostile: Callable[..., None]) -> None:
    hostile(lambda conn, req: conn.sendall(protocol.encode({"id": req["id"], "ok": False,
                                                            "error": "\x1b[2J\x1b]52;c;cHduZWQ=\x07"})))
    with pytest.raises(AgentError) as info:
        agent.request(files, "vm", "status", timeout=5)
    assert "\x1b" not in info.value.message and "\\x1b[2J" in info.value.message


@pytest.mark.parametrize("reply", [
    {"services": ["web"]},
    {"services": {"web": {"restarts": "many"}}},
    {"health": {"web": {"state": "bogus"}}},
    {"health": "x"},
    {"uptime": {"a": 1}},
])
def test_status_of_the_wrong_shape_is_an_agent_error(reply: dict[str, object]) -> None:
    with pytest.raises(AgentError, match="malformed status"):
        GuestStatus.from_agent(reply, "vm")


def test_status_text_is_made_printable() -> None:
    status = GuestStatus.from_agent({"services": {"w\x1bb": {"state": "running", "reason": "\x1b[31mred"}},
                                     "health": {"c": {"state": "healthy", "last_output": "ok\n\x07"}}}, "vm")
    assert status.services[0].name == "w\\x1bb" and status.services[0].reason == "\\x1b[31mred"
    assert status.checks[0].last_output == "ok\n\\x07"


# --- the event log ------------------------------------------------------------------------------


def _events(files: VMFiles, *lines: bytes) -> None:
    files.events_log.write_bytes(b"\n".join(lines) + b"\n")


def test_hostile_events_never_break_logs(files: VMFiles) -> None:
    _events(
        files,
        DEEP,
        b'{"kind":"log","t":"noon","svc":{"a":[1,2]},"line":["x"]}',
        b'{"kind":"log","t":1e300,"svc":"web","line":"big time"}',
        b'{"kind":"log","t":-1e20,"svc":"web","line":"negative"}',
        b'{"kind":"service","t":true,"svc":null,"state":{"s":1},"pid":"x","reason":"\\u001b[31mred"}',
        b'{"kind":"health","check":7,"state":[],"exit":{},"output":"\\u001b]0;title\\u0007"}',
        b'{"kind":"init","msg":"\\u202eevil"}',
        b'"just a string"',
        b'{"kind":"log","svc":"web","line":"' + b"z" * (300 * 1024) + b'"}',
        b'{"kind":"log","t":1.0,"svc":"web","line":"last"}',
    )
    files.console_log.write_bytes(b"boot \x1b[2J\x1b]52;c;cHduZWQ=\x07 done\r\n")
    out = [line.text for line in logs.stream(files)]
    text = "\n".join(out)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b[2J" in text and "\\u202eevil" in text
    assert "big time" in text and "negative" in text and "last" in text
    assert out.count("[mvm] an event line longer than 256 KiB was left out") == 2  # DEEP, and the long line
    assert not any("zzzz" in line for line in out)
    assert logs.service_tail(files, "web").endswith("last")


def test_logs_json_lines_carry_typed_printable_fields(files: VMFiles) -> None:
    _events(
        files,
        b'{"kind":"log","t":12.5,"svc":"web","stream":"stderr","line":"GET / 200"}',
        b'{"kind":"health","t":13,"check":"http","state":"healthy","exit":0}',
        b'{"kind":"log","t":"noon","svc":{"a":1},"line":"x"}',
        b'{"kind":"service","t":14,"svc":"\\u001b[31mweb","state":"running","pid":7}',
    )
    files.console_log.write_bytes(b"boot\n")
    rows = [json.loads(json.dumps(line.as_json())) for line in logs.stream(files)]
    assert rows[0] == {"source": "console", "time": None, "service": None, "check": None, "text": "boot"}
    log, health, odd, svc = rows[1:]
    assert (log["source"], log["time"], log["service"], log["check"]) == ("service", 12.5, "web", None)
    assert log["text"].endswith("web | GET / 200")
    assert (health["source"], health["time"], health["service"], health["check"]) == ("health", 13.0, None, "http")
    assert (odd["time"], odd["service"]) == (None, None)  # wrong types are left out, not passed on
    assert svc["service"] == "\\x1b[31mweb"  # made printable, as the text is


def test_an_endless_event_line_is_dropped_and_said_so(files: VMFiles) -> None:
    files.events_log.write_bytes(b'{"kind":"log","svc":"web","line":"' + b"z" * (3 << 20))
    out = [line.text for line in logs.stream(files)]
    assert out == ["[mvm] an event line longer than 256 KiB was left out"]
    with open(files.events_log, "ab") as f:
        f.write(b'"}\n{"kind":"log","t":1.0,"svc":"web","line":"after"}\n')
    assert [line.text.split(" ", 1)[1] for line in logs.stream(files)][-1] == "web | after"


def test_reading_a_huge_log_is_bounded(files: VMFiles) -> None:
    line = b'{"kind":"log","t":1.0,"svc":"web","line":"' + b"y" * 1000 + b'"}\n'
    with open(files.events_log, "wb") as f:
        for _ in range(40):
            f.write(line * 1000)  # 40 MB
    tracemalloc.start()
    try:
        tail = list(logs.stream(files, lines=3))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(tail) == 3
    assert peak < 8 << 20, f"{peak} bytes held to read the last 3 lines of a 40 MB log"
    reader = logs._Tail(files.events_log)
    try:
        assert sum(len(x) for x in reader.read()) <= logs.READ_CHUNK
    finally:
        reader.close()


def test_logs_follow_stops_reading_at_the_size_it_found(files: VMFiles) -> None:
    """A guest that keeps writing cannot keep the first part of `logs -n N` going."""
    files.events_log.write_bytes(b'{"kind":"init","t":1.0,"msg":"one"}\n')
    stop = threading.Event()

    def writer() -> None:
        with open(files.events_log, "ab") as f:
            while not stop.is_set():
                f.write(b'{"kind":"init","t":1.0,"msg":"more"}\n' * 100)
                f.flush()
                time.sleep(0.001)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        assert len(list(logs.stream(files, lines=1, console=False))) == 1
    finally:
        stop.set()
        thread.join()


# --- the cp tar stream ---------------------------------------------------------------------------


def test_a_huge_pax_header_is_refused() -> None:
    raw = io.BytesIO()
    info = tarfile.TarInfo("pax")
    info.type = tarfile.XHDTYPE
    info.size = 512 << 20  # tarfile would read all of it into memory
    raw.write(info.tobuf(format=tarfile.USTAR_FORMAT))
    raw.write(b"\0" * 1024)
    raw.seek(0)
    with pytest.raises(tarfile.ReadError), tarfile.open(fileobj=raw, mode="r|", tarinfo=BoundedTarInfo) as tar:
        list(tar)


def _guest_tar(*entries: tuple[str, str, object]) -> bytes:
    """A stream as the guest's `cp` sends it: (kind, name under TOP, link target or data)."""
    from mvm.guest.copy import TOP

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        top = tarfile.TarInfo(TOP)
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        for kind, name, extra in entries:
            info = tarfile.TarInfo(f"{TOP}/{name}")
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, int(str(extra), 8) if extra else 0o755
                tar.addfile(info)
            elif kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = str(extra)
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                data = str(extra).encode()
                info.size, info.mode = len(data), int(kind, 8)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _cp_out(monkeypatch: pytest.MonkeyPatch, stream: bytes, dest: Path | str) -> list[str]:
    """`cp VM:/x DEST` with the guest's side replaced by ``stream`` (written as the agent
    passes it on: in pieces, so a reader that stops makes the writer's pipe break)."""
    from mvm._api import copy

    def run(vm: object, args: list[str], feed: object, sink: io.BufferedWriter) -> None:
        for at in range(0, len(stream), 65536):
            sink.write(stream[at:at + 65536])

    monkeypatch.setattr(copy, "_run", run)
    return copy._to_host(type("FakeVM", (), {"name": "guest"})(), "/x", str(dest))  # type: ignore[arg-type]


def test_cp_out_never_writes_through_a_link(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CVE-2025-4517: past PATH_MAX, os.path.realpath stops resolving links, so tarfile's data
    filter (in Pythons before 3.11.13) passed a link, and an entry through it, that lead out of
    the destination. A security review's reproduction, which wrote outside/pwned through
    `mvmctl cp` on this project's Python 3.11.7."""
    outside, dest = tmp_path / "outside", tmp_path / "dest"
    outside.mkdir()
    dest.mkdir()
    long, steps = "d" * 247, "abcdefghijklmnop"
    entries: list[tuple[str, str, object]] = []
    path = ""
    for step in steps:
        entries += [("dir", path + long, None), ("sym", path + step, long)]
        path += long + "/"
    deep = "/".join(steps) + "/" + "l" * 254
    entries += [("sym", deep, "/".join([".."] * len(steps))),
                ("sym", "escape", deep + "/../../outside"),
                ("0644", "escape/pwned", "written by the guest")]
    with pytest.raises(UsageError, match="on the way is not a directory"):
        _cp_out(monkeypatch, _guest_tar(*entries), dest)
    assert not list(outside.iterdir())
    # a link the host already has at a target's name is replaced, never written through
    (tmp_path / "victim").write_text("host data")
    (dest / "x" / "f").symlink_to(tmp_path / "victim")
    _cp_out(monkeypatch, _guest_tar(("4755", "f", "from the guest")), dest)
    assert (tmp_path / "victim").read_text() == "host data"
    f = dest / "x" / "f"
    assert not f.is_symlink() and f.read_text() == "from the guest" and f.stat().st_mode & 0o7777 == 0o755


def test_cp_out_keeps_the_modes_of_the_directories_it_makes(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """A guest's 0700 directory came out 0755 (readable by every user of the host); the
    modes a file loses (group and others' write) a directory loses too."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "x").mkdir(mode=0o750)  # there already: keeps its own mode, as `cp -r` leaves it
    _cp_out(monkeypatch, _guest_tar(("dir", "private", "700"), ("dir", "shared", "775"),
                                    ("0600", "private/key", "k")), tmp_path / "new")
    modes = {p.name: p.stat().st_mode & 0o7777 for p in (tmp_path / "new").iterdir()}
    assert modes == {"private": 0o700, "shared": 0o755}
    _cp_out(monkeypatch, _guest_tar(("dir", "private", "700")), dest)
    assert (dest / "x").stat().st_mode & 0o7777 == 0o750 and (dest / "x" / "private").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(("entry", "refusal", "whole"), [
    # left out, the rest copied (as `volume export` does; a guest's /etc has such links)
    (("sym", "abs", "/etc/shadow"), "a link to the absolute path '/etc/shadow'", False),
    (("sym", "d/esc", "../../../x"), "a link that leaves the destination", False),  # dest/x/d/../../.. is dest/..
    (("fifo", "p", None), "device node, FIFO", False),
    # refused whole: no guest's own `tar` makes these
    (("hard", "h", "/etc/passwd"), "unexpected entry '/etc/passwd'", True),  # not a name of the stream
    (("0644", "../up", "x"), "outside the destination", True),
])
def test_cp_out_refuses_what_the_data_filter_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     entry: tuple[str, str, object], refusal: str,
                                                     whole: bool) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    stream = _guest_tar(("dir", "d", None), entry, ("0644", "after", "copied"))
    if whole:
        with pytest.raises(UsageError, match=refusal):
            _cp_out(monkeypatch, stream, dest)
    else:
        (skipped,) = _cp_out(monkeypatch, stream, dest)
        assert refusal in skipped and (dest / "x" / "after").read_text() == "copied"
    assert {p.name for p in tmp_path.rglob("*")} <= {"dest", "x", "d", "after"}


@pytest.mark.parametrize("entries", [
    [("sym", "a", "."), ("sym", "b", "a/..")],  # each inside by its text, `b` leads to dest/..
    [("dir", "d", None), ("sym", "d/a", "."), ("sym", "d/b", "a/../.."), ("sym", "c", "d/b/secret")],
    [("dir", "site", None), ("sym", "site/l", "../../secret")],
])
def test_cp_out_refuses_a_chain_of_links_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              entries: list[tuple[str, str, object]]) -> None:
    """A review's finding: links checked by their text alone let a chain of them leave."""
    (tmp_path / "secret").write_text("host")
    dest = tmp_path / "dest"
    dest.mkdir()
    skipped = _cp_out(monkeypatch, _guest_tar(*entries), dest)
    assert [s for s in skipped if "a link that leaves the destination" in s]
    assert not [p for p in dest.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(dest)]


def test_cp_out_refuses_a_hard_link_to_a_link_and_sparse_files(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """A second review: a hard link puts a symlink at another depth, where its leading '..'
    climb further (a/a/l -> ../../x, linked as `escape`, read ../x); a sparse entry of a few
    KiB unpacks to any size."""
    from mvm.guest.copy import TOP

    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UsageError, match="hard link to something other than a file"):
        _cp_out(monkeypatch, _guest_tar(("dir", "a", None), ("dir", "a/a", None), ("sym", "a/a/l", "../../x"),
                                        ("hard", "escape", f"{TOP}/a/a/l")), dest)
    assert not (dest / "x" / "escape").exists()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        top = tarfile.TarInfo(TOP)
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        sparse = tarfile.TarInfo(f"{TOP}/big")
        sparse.type = tarfile.GNUTYPE_SPARSE
        tar.addfile(sparse)
    with pytest.raises(UsageError, match="sparse"):
        _cp_out(monkeypatch, raw.getvalue(), tmp_path / "sp")


def test_cp_out_reads_a_bounded_tail_after_the_archive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A third review: after the archive's end `cp` read whatever followed, forever."""
    whole = _guest_tar(("0644", "f", "x"))
    _cp_out(monkeypatch, whole + b"\0" * 10240, tmp_path / "a")  # a record's padding: a finished copy
    assert (tmp_path / "a" / "f").read_text() == "x"
    with pytest.raises(UsageError, match="more after the end of the archive"):
        _cp_out(monkeypatch, whole + b"\0" * (2 << 20), tmp_path / "b")


def test_cp_out_of_a_link_and_of_a_long_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cp vm:/srv/current ./x` where current -> releases/7 copies the link; a 255-byte name
    of 3-byte characters leaves no room for a longer temporary name."""
    from mvm.guest.copy import TOP

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo(TOP)
        link.type, link.linkname = tarfile.SYMTYPE, "releases/7"
        tar.addfile(link)
    _cp_out(monkeypatch, raw.getvalue(), tmp_path / "x")
    assert os.readlink(tmp_path / "x") == "releases/7"
    long = "€" * 85  # 255 bytes
    _cp_out(monkeypatch, _guest_tar(("0644", long, "x")), tmp_path / "d")
    assert (tmp_path / "d" / long).read_text() == "x"


def test_cp_out_keeps_a_new_top_entrys_links_inside_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cp web:/srv/site ./site` (./site new): a link in it may not point beside it."""
    (tmp_path / "secret").write_text("host")
    (skipped,) = _cp_out(monkeypatch, _guest_tar(("sym", "l", "../secret")), tmp_path / "site")
    assert "leaves the destination" in skipped and not (tmp_path / "site" / "l").is_symlink()


def test_cp_out_to_a_bare_relative_name_lands_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cp web:/var/log/app.log app.log` unpacked into / (as root: /app.log)."""
    from mvm.guest.copy import TOP

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(TOP)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"log"))
    monkeypatch.chdir(tmp_path)
    _cp_out(monkeypatch, raw.getvalue(), "mvm-test-app.log")
    assert (tmp_path / "mvm-test-app.log").read_text() == "log"
    assert not Path("/mvm-test-app.log").exists()


def test_cp_out_says_why_it_stopped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A refusal with more of the stream behind it: the refusal, not a silent broken pipe."""
    with pytest.raises(UsageError, match="outside the destination"):
        _cp_out(monkeypatch, _guest_tar(("0644", "../p", "x"), ("0644", "big", "x" * (4 << 20))), tmp_path)


def test_cp_out_keeps_a_file_it_could_not_replace_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("old")
    whole = _guest_tar(("0644", "f", "new" * 100_000))
    with pytest.raises(UsageError):
        _cp_out(monkeypatch, whole[:len(whole) // 2], tmp_path)  # the stream ends in the file
    assert (tmp_path / "x" / "f").read_text() == "old" and os.listdir(tmp_path / "x") == ["f"]


def test_cp_out_keeps_links_that_stay_inside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mvm.guest.copy import TOP

    _cp_out(monkeypatch, _guest_tar(("dir", "d", None), ("0600", "d/data", "shared"), ("hard", "h", f"{TOP}/d/data"),
                                    ("sym", "d/rel", "../h")), tmp_path)
    root = tmp_path / "x"
    assert (root / "h").stat().st_ino == (root / "d" / "data").stat().st_ino
    assert (root / "d" / "rel").read_text() == "shared" and (root / "d" / "data").stat().st_mode & 0o777 == 0o600


def test_printable() -> None:
    assert printable("a\tb\nc\x00\x7f\x9b") == "a\tb\\x0ac\\x00\\x7f\\x9b"
    assert printable("x" * 50, 10).startswith("x" * 10 + "…")
    assert printable({"a": 1}) == "{'a': 1}"


def test_cp_out_to_stdout_streams_the_tar_under_the_source_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp VM:/x -` (docker cp's): the archive on stdout, its top entry named as the source
    (the guest's names it by a placeholder), the guest's modes kept, nothing on the host."""
    from mvm._api import copy

    stream = _guest_tar(("dir", "d", None), ("0640", "d/f", "hello"))

    def run(vm: object, args: list[str], feed: object, sink: io.BufferedWriter) -> None:
        sink.write(stream)

    monkeypatch.setattr(copy, "_run", run)
    out = io.BytesIO()
    copy._to_stream(type("FakeVM", (), {"name": "guest"})(), "/srv/site", out)  # type: ignore[arg-type]
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert [m.name for m in tar.getmembers()] == ["site", "site/d", "site/d/f"]
        assert tar.getmember("site/d/f").mode == 0o640
        member = tar.extractfile("site/d/f")
        assert member is not None and member.read() == b"hello"


def test_the_guests_cp_sends_a_link_as_it_is_or_follows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.guest import copy as guest_copy

    (tmp_path / "real").write_text("data")
    (tmp_path / "link").symlink_to("real")

    def sent(follow: bool) -> tarfile.TarInfo:
        out = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
        guest_copy.copy_out(str(tmp_path / "link"), follow=follow)
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            (member,) = tar.getmembers()
            return member

    assert sent(False).issym()
    followed = sent(True)
    assert followed.isfile() and followed.name == guest_copy.TOP and followed.size == 4


def test_a_stats_reply_keeps_only_well_typed_values() -> None:
    from mvm._api.stats import _GuestSample, _ServiceSample

    sample = _GuestSample.of({"services": {"a": {"pid": "x", "cpu_seconds": 2.5, "memory_bytes": -5}, "b": 3},
                              "memory_total": "big", "memory_available": 1024})
    assert sample == _GuestSample({"a": _ServiceSample(pid=None, cpu_seconds=2.5, memory_bytes=0)}, None, 1024)
    assert _GuestSample.of({"services": ["not", "a", "dict"]}) == _GuestSample()
