"""Pure logic of the guest agent (runs on the host; the guest code is stdlib-only)."""

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mvm.guest import handover, protocol, supervisor
from mvm.guest.handover import hand_over
from mvm.guest.health import STARTING_NICE, next_state, probe_nice
from mvm.guest.supervisor import BACKOFF_CAP, Identity, backoff_delay, should_restart


def test_backoff_is_exponential_and_capped() -> None:
    delays = [backoff_delay(n) for n in range(1, 12)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == BACKOFF_CAP and delays == sorted(delays)


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [("always", 0, True), ("always", 1, True), ("on-failure", 0, False), ("on-failure", -9, True),
     ("no", 1, False)],
)
def test_restart_policy(policy: str, code: int, restart: bool) -> None:
    assert should_restart(policy, code) is restart


def test_a_program_the_shell_cannot_run_is_told_apart() -> None:
    assert "command not found" in (supervisor.cannot_run(127, 0.2) or "")
    assert "cannot be executed" in (supervisor.cannot_run(126, 3.0) or "")
    assert supervisor.cannot_run(1, 0.2) is None
    assert set(supervisor._SHELL_CANNOT_RUN) == protocol.SHELL_CANNOT_RUN  # what the host counts as failing
    assert supervisor.cannot_run(127, supervisor.BACKOFF_RESET_AFTER) is None  # it ran: maybe luckier next time


def test_probes_yield_the_cpu_only_while_their_check_is_starting() -> None:
    assert probe_nice("starting") == STARTING_NICE > 0
    assert probe_nice("healthy") == probe_nice("unhealthy") == 0


def test_a_probe_inherits_the_niceness_of_its_thread() -> None:
    """What the check thread sets is what its command runs with (a fork keeps the calling
    thread's niceness): run in a thread of its own, like a check."""
    import subprocess
    import threading

    from mvm.guest.health import _set_thread_nice

    seen: list[str] = []

    def probe() -> None:
        _set_thread_nice(STARTING_NICE)
        seen.append(subprocess.run(["sh", "-c", "cut -d' ' -f19 /proc/self/stat"], capture_output=True,
                                   text=True).stdout.strip())

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen == [str(STARTING_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # the rest of the process is untouched


def test_health_transitions() -> None:
    assert next_state("starting", passed=False, in_grace=True) == "starting"
    assert next_state("starting", passed=False, in_grace=False) == "unhealthy"
    assert next_state("starting", passed=True, in_grace=True) == "healthy"
    assert next_state("healthy", passed=False, in_grace=True) == "unhealthy"
    assert next_state("unhealthy", passed=True, in_grace=False) == "healthy"


def test_line_buffer_keeps_partial_lines() -> None:
    buf = protocol.LineBuffer()
    assert buf.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert buf.feed(b':2}\n\n') == [b'{"b":2}']
    assert protocol.decode(protocol.encode({"x": "é\n"})) == {"x": "é\n"}


def test_write_all_loops_past_short_writes() -> None:
    r, w = os.pipe()
    data = b"x" * (200 * 1024)
    import threading

    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 7000):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    protocol.write_all(w, data)
    os.close(w)
    reader.join()
    os.close(r)
    assert bytes(got) == data


def _prestart(mark: int, script: str, cwd: Path) -> None:
    """What a preStart does, as PID 1 runs it: root, with the run's marker group only."""
    subprocess.run(["sh", "-c", script], cwd=cwd, check=True, **Identity("root").marked(mark).popen_args())


def test_hand_over_gives_the_prestarts_files_only(tmp_path: Path) -> None:
    """What the preStart made, however deep; not what root had there (nor what a root
    service or `exec` makes meanwhile: their group is root's)."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "key").write_text("root's")
    mark = handover.marker()
    _prestart(mark, "mkdir -p new/deep && echo x > new/deep/f && ln -s /etc new/link", tmp_path)
    (tmp_path / "root-service.log").write_text("a root service's, meanwhile")
    assert hand_over([str(tmp_path)], mark, 12345, 12346) == (3, [])
    assert os.stat(tmp_path / "new" / "deep" / "f")[4:6] == (12345, 12346)
    for kept in ("old", "old/key", "root-service.log"):
        assert os.stat(tmp_path / kept).st_uid == 0, kept
    assert os.lstat(tmp_path / "new" / "link").st_uid == 0  # links are left alone
    assert hand_over([str(tmp_path)], handover.marker(), 12345, 12346) == (0, [])  # another run's mark


def test_hand_over_never_follows_a_link_swapped_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A security review's race: a service swaps the directory a root preStart made in a
    shared volume for a link to /etc while PID 1 hands the new paths over; by path, /etc's
    files were chowned to the service user. Here the swap happens at the hand-over's first
    change of an owner."""
    volume, etc = tmp_path / "volume", tmp_path / "etc"
    volume.mkdir()
    etc.mkdir()
    mark = handover.marker()
    _prestart(mark, f"echo \"root's\" > {etc}/f && mkdir logs && echo x > logs/f", volume)
    real_chown = os.chown

    def chown(*args: Any, **kwargs: Any) -> None:
        if not (tmp_path / "moved").exists():
            os.rename(volume / "logs", tmp_path / "moved")
            os.symlink(etc, volume / "logs")
        real_chown(*args, **kwargs)

    monkeypatch.setattr(os, "chown", chown)
    hand_over([str(volume)], mark, 12345, 12345)
    monkeypatch.undo()
    assert (volume / "logs").is_symlink()  # the race happened
    assert os.stat(etc / "f").st_uid == 0 and os.stat(etc).st_uid == 0


def test_hand_over_leaves_hard_linked_files_and_needs_few_descriptors(tmp_path: Path) -> None:
    """A review's findings: a file with a second name may be another's (hard-linked into
    /tmp); os.fwalk held one descriptor per level without a bound, and a deep tree in /tmp
    ran PID 1 out of them."""
    import resource

    mark = handover.marker()
    depth = handover.MAX_DEPTH - 1
    _prestart(mark, "echo x > conf && ln conf linked && mkdir -p " + "/".join(["d"] * depth), tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (handover.MAX_DEPTH + 40, hard))
    try:
        changed, _ = hand_over([str(tmp_path)], mark, 12345, 12345)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert changed == depth  # every directory, to the bound
    assert os.stat(tmp_path / "conf").st_uid == 0


def test_old_files_are_never_given_away_however_they_are_moved(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviews two to four: a path or inode comparison of the tree before and after the
    preStart let a racing service get root's files (rename a root directory; exchange it with
    the preStart's during the walk; refill a name while the snapshot read it). A file the
    preStart did not make lacks its group, wherever it is moved."""
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "key").write_text("root's")
    mark = handover.marker()
    _prestart(mark, "echo made > new", tmp_path)
    os.rename(tmp_path / "db", tmp_path / "X")  # moved, as the racing service would
    real_open = os.open

    def exchanging_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "new" and flags & os.O_PATH:  # after the walk checked `new`, before it is opened
            os.rename(tmp_path / "new", tmp_path / "tmp")
            os.rename(tmp_path / "X" / "key", tmp_path / "new")
            os.rename(tmp_path / "tmp", tmp_path / "X" / "key")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", exchanging_open)
    hand_over([str(tmp_path)], mark, 12345, 12345)
    monkeypatch.undo()
    assert (tmp_path / "new").read_text() == "root's"  # the exchange happened
    assert os.stat(tmp_path / "new").st_uid == 0 and os.stat(tmp_path / "X").st_uid == 0


def test_a_hand_over_leaves_out_what_is_past_its_bounds_and_says_so(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A fourth review: a listing was read whole before any bound (1M names, 255 MiB); a
    fifth: a bound that ended the whole hand-over let any user keep another service from
    getting its files (a deep chain planted in /tmp, walked first)."""
    mark = handover.marker()
    tmp, volume = tmp_path / "tmp", tmp_path / "volume"
    tmp.mkdir()
    volume.mkdir()
    os.makedirs(tmp / "/".join(["d"] * (handover.MAX_DEPTH + 1)))  # planted by another user
    _prestart(mark, "echo x > mine", volume)
    changed, left_out = hand_over([str(tmp), str(volume)], mark, 12345, 12345)
    assert changed == 1 and os.stat(volume / "mine").st_uid == 12345
    assert left_out and "deeper than" in left_out[0]
    monkeypatch.setattr(handover, "MAX_ENTRIES", 10)
    for i in range(50):
        (tmp / str(i)).touch()
    assert "more than 10 entries" in hand_over([str(tmp)], mark, 12345, 12345)[1][0]


def test_a_marker_is_random_and_never_twice_in_a_boot() -> None:
    """A fifth review: markers counted up from the same number each boot, and volumes outlive
    a boot: a root service's file left with boot 1's first mark went to whichever service drew
    it in boot 2."""
    marks = [handover.marker() for _ in range(1000)]
    assert len(set(marks)) == 1000 and all(handover.MARKER_BASE <= m < 2**32 - 1 for m in marks)
    assert marks != sorted(marks)


def test_cp_destination_rules(tmp_path: Path) -> None:
    from mvm.guest.copy import CopyError, destination

    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    d, f, missing = str(tmp_path / "dir"), str(tmp_path / "file"), str(tmp_path / "new")
    assert destination(d, False, "a.txt", False) == (d, "a.txt")  # a file into a directory
    assert destination(missing, False, "a.txt", False) == (str(tmp_path), "new")  # renamed
    assert destination(f, False, "a.txt", False) == (str(tmp_path), "file")  # replaces the file
    assert destination(d, True, "site", False) == (d, "site")  # a directory into a directory
    assert destination(d, True, "site", True) == (d, None)  # SRC/. : its contents
    assert destination(missing, True, "site", False) == (str(tmp_path), "new")  # created with that name
    for args, message in (((f, True, "site", False), "onto the file"),
                          ((missing + "/", False, "a", False), "trailing /"),
                          ((str(tmp_path / "no" / "x"), False, "a", False), "does not exist")):
        with pytest.raises(CopyError, match=message):
            destination(*args)  # type: ignore[arg-type]


def test_a_cp_cut_short_leaves_no_partial_file_and_the_old_one_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream that ends inside a file (as a full disk or a dropped connection ends a copy):
    the file it was to replace keeps its bytes and no part of the new one is left."""
    import io
    import tarfile
    import types

    from mvm.guest.copy import copy_in

    from .cp_streams import one_file

    payload = b"new" * 100_000
    stream = one_file(payload)
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def copy(data: bytes) -> None:
        monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))
        copy_in(str(target), False, "data.bin", False, False)

    with pytest.raises(tarfile.ReadError):
        copy(stream[:150_000])
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]
    copy(stream)  # whole: replaces it
    assert target.read_bytes() == payload and sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]
    target = tmp_path / ("n" * 250)  # a name near the 255-byte limit: its temporary name must fit too
    copy(stream)
    assert target.read_bytes() == payload


def test_cp_rename_refuses_entries_outside_the_stream() -> None:
    import tarfile

    from mvm.guest.copy import TOP, CopyError, rename

    member = tarfile.TarInfo(f"{TOP}/a/b")
    member.uid = 1000
    renamed = rename(member, "site", archive=False)
    assert renamed is not None and renamed.name == "site/a/b" and renamed.uid == 0
    assert rename(tarfile.TarInfo(TOP), None, archive=True) is None
    with pytest.raises(CopyError, match="unexpected entry"):
        rename(tarfile.TarInfo("../etc/passwd"), "x", archive=False)


def test_an_oom_kill_is_told_apart_from_any_other_sigkill() -> None:
    from mvm.guest.oom import oom_kill_of

    records = [
        (5.0, "Out of memory: Killed process 80 (old) total-vm:1kB"),  # before this run: not ours
        (12.5, "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,"
               "task_memcg=/,task=python3,pid=215,uid=1000"),
        (12.5, "Out of memory: Killed process 215 (python3) total-vm:185992kB, anon-rss:173764kB, UID:1000"),
    ]
    why = oom_kill_of(215, 1000, -9, since=10.0, records=records)
    assert why == "out of memory: the kernel's OOM killer killed python3 (pid 215)"
    assert oom_kill_of(214, 1000, 137, since=10.0, records=records) == why  # its shell saw a child die
    assert oom_kill_of(214, 1001, 137, since=10.0, records=records) is None  # another user's process
    assert oom_kill_of(215, 1000, 1, since=10.0, records=records) is None  # not a SIGKILL
    assert oom_kill_of(80, 1000, -9, since=10.0, records=records) is None  # an older kill of a reused pid
    assert oom_kill_of(215, 1000, -9, since=10.0, records=[]) is None  # `kill -9` by someone: no reason


def test_a_service_line_without_end_reaches_the_log_in_pieces() -> None:
    import io

    from mvm.guest.supervisor import LINE_LIMIT, pump_lines

    class Events:
        lines: list[str] = []

        def log(self, svc: str, stream: str, line: str) -> None:
            self.lines.append(line)

    events = Events()
    pump_lines(io.BufferedReader(io.BytesIO(b"y" * (3 * LINE_LIMIT + 5) + b"\nlast\n")), events, "s", "stdout")  # type: ignore[arg-type]
    assert [len(line) for line in events.lines] == [LINE_LIMIT, LINE_LIMIT, LINE_LIMIT, 5, 4]


def test_a_health_check_that_prints_without_end_keeps_only_its_tail() -> None:
    import io

    from mvm.guest.health import OUTPUT_LIMIT, _read_tail

    out: list[bytes] = []
    _read_tail(io.BufferedReader(io.BytesIO(b"a" * (5 << 20) + b"end")), out)
    assert len(out[0]) == OUTPUT_LIMIT and out[0].endswith(b"end")


def test_a_service_uptime_ignores_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restored clone's wall clock jumps to the host's (the template may be hours old): a
    service's uptime must not include that jump."""
    import time

    from mvm.guest.supervisor import Service

    service = Service("web", {"command": ["true"]}, sup=None)  # type: ignore[arg-type]
    service.state, service.started_at = "running", time.monotonic() - 3.0
    monkeypatch.setattr(time, "time", lambda: 1e10)  # the clock set after a restore
    assert 3.0 <= service.status()["uptime"] < 10.0


def test_the_guest_checks_a_hostname_as_the_host_does() -> None:
    from mvm.guest.system import valid_hostname
    from mvm.names import check_hostname

    for name in ("web", "web-1.internal", "A1", "x" * 63, "web\n10.0.0.1 bank", "a b", "-web", "web-", "a..b",
                 "x" * 64, "é", ""):
        try:
            host_ok = check_hostname(name) == name
        except ValueError:
            host_ok = False
        assert valid_hostname(name) == host_ok, name


def _control_server(status: Any) -> Any:
    from mvm.guest.control import ControlServer

    class NoReaper:
        def spawn(self, *args: object, **kwargs: object) -> None:
            raise TypeError("a bug in the agent")

    return ControlServer([], reaper=NoReaper(), status=status, shutdown=lambda: None,  # type: ignore[arg-type]
                         configure=lambda config: None, env_overrides={}, path="/usr/bin:/bin",
                         signals=None)  # type: ignore[arg-type]


def _replies(sock: Any) -> list[dict[str, Any]]:
    buf = protocol.LineBuffer()
    out: list[dict[str, Any]] = []
    sock.settimeout(5)
    while not out or "ok" not in out[-1]:
        out += [protocol.decode(line) for line in buf.feed(sock.recv(65536))]
    return out


def test_a_request_the_agent_fails_on_is_answered_and_the_port_keeps_working() -> None:
    """An error no handler expected (a bug, an odd value) used to end the port's thread: that
    port never answered again. Now the request gets an error and the next one its answer."""
    import socket

    from mvm.guest.execstream import Connection

    def broken_status() -> dict[str, Any]:
        raise RuntimeError("cannot read /proc")

    host, guest = socket.socketpair()
    server, conn = _control_server(broken_status), Connection(guest.fileno())
    with host, guest:
        _fail_and_go_on(server, conn, host)


def _fail_and_go_on(server: Any, conn: Any, host: Any) -> None:
    server._dispatch(conn, b'{"op": "stats", "id": 1}')
    [reply] = _replies(host)
    assert reply == {"ok": False, "id": 1,
                     "error": "the guest agent failed on 'stats': RuntimeError('cannot read /proc')"}
    server._dispatch(conn, b'{"op": "ping", "id": 2}')
    assert _replies(host)[-1]["ok"] is True
    server._dispatch(conn, b'{"op": "exec", "id": 3, "argv": ["true"]}')  # the command's thread fails
    reply = _replies(host)[-1]
    assert reply["ok"] is False and reply["exit"] == 127 and "a bug in the agent" in reply["error"]
    assert conn.active is None or conn.active.done.wait(5)
    server._dispatch(conn, b'{"op": "ping", "id": 4}')  # the port is not held by the dead command
    reply = _replies(host)[-1]
    assert reply["ok"] is True and reply["id"] == 4


def test_input_for_a_command_that_has_ended_is_dropped_without_a_reply() -> None:
    """`yes | mvmctl exec -i VM -- head -1`: the host keeps sending stdin after head ended.
    Each piece used to get an 'unknown op' reply, a flood the next client then read."""
    import socket

    from mvm.guest.execstream import Connection

    host, guest = socket.socketpair()
    server, conn = _control_server(lambda: {}), Connection(guest.fileno())
    with host, guest:
        for _ in range(3):
            server._dispatch(conn, b'{"op": "stdin", "id": "gone", "data": "eQo="}')
        server._dispatch(conn, b'{"op": "eof", "id": "gone"}')
        server._dispatch(conn, b'{"op": "ping", "id": "next"}')
        [reply] = _replies(host)  # the next client's answer, and nothing before it
        assert reply["id"] == "next" and reply["ok"] is True


def test_a_user_is_found_by_name_or_by_uid() -> None:
    assert Identity("root").uid == 0 and Identity("0").name == "root"  # exec -u 0, as docker exec -u takes
    with pytest.raises(KeyError):
        Identity("4294967")  # no such uid: exec says "no user" (126)


def test_a_service_whose_shell_cannot_start_is_reported_not_hung() -> None:
    """`-v ./cfg:/usr/bin` hid /bin/sh: Popen raised in the service's thread, which died, and
    the service stayed 'prestart' for good, no reason given, up --wait waiting it out."""
    import time

    from mvm.guest.supervisor import Supervisor

    class NoShell:
        def spawn(self, *args: object, **kwargs: object) -> None:
            raise FileNotFoundError(2, "No such file or directory", "/bin/sh")

    class Events:
        def emit(self, kind: str, **fields: object) -> None:
            pass

    sup = Supervisor({"pre": {"command": "true", "preStart": "mkdir /x", "user": "root"},
                      "web": {"command": "serve", "user": "root"}},
                     reaper=NoShell(), events=Events(), env_overrides={}, handover_roots=[])  # type: ignore[arg-type]
    sup.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (sup.status()["web"]["state"], sup.status()["pre"]["state"]) != (
                "backoff", "failed"):  # each thread gets there in its own time (a loaded host)
            time.sleep(0.05)
        web, pre = sup.status()["web"], sup.status()["pre"]
        assert web["state"] == "backoff" and web["last_exit"] == 127 and "/bin/sh" in web["reason"], web
        assert pre["state"] == "failed" and "preStart could not start" in pre["reason"], pre
    finally:
        sup.stopping.set()
