"""The guest agent's input path for ``exec``/``cp``/``console``: real commands under a real
reaper (each in a Python of its own, as PID 1's threads are), the port a socket pair."""

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvm.guest import execstream

_AGENT = """
import base64, socket, sys, threading, time
from mvm.guest.control import ControlServer
from mvm.guest.execstream import Connection, StreamOp
from mvm.guest.reaper import Reaper
reaper = Reaper()
threading.Thread(target=reaper.loop, daemon=True).start()
server = ControlServer([], reaper=reaper, status=dict, shutdown=lambda: None, configure=lambda c: None,
                       env_overrides={}, path="/usr/bin:/bin", signals=None)
host, guest = socket.socketpair()
replies = []
def read_host():
    for data in iter(lambda: host.recv(65536), b""):
        replies.append(data)
reading = threading.Thread(target=read_host, daemon=True)
reading.start()
conn = Connection(guest.fileno())
def run(req):
    op = StreamOp(conn, {"id": 1, "user": "root", "cwd": "/", **req}, server)
    conn.active = op
    return op
def feed(op, chunks, size=32768):
    for _ in range(chunks):
        op.feed({"op": "stdin", "data": base64.b64encode(b"x" * size).decode()})
"""


def _agent(script: str) -> str:
    r = subprocess.run([sys.executable, "-c", _AGENT + script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_held_input_larger_than_a_pipe_reaches_a_command_that_echoes_it() -> None:
    """`exec -i VM -- tee /x < big` (and cp of a large file): the input held before the command
    started was written before its output was read, so `cat` filled its stdout pipe, stopped
    reading, and the write (with the agent's reader behind its lock) hung for good."""
    out = _agent("""
op = run({"argv": ["cat"]})
feeding = threading.Thread(target=lambda: (feed(op, 16), op.feed({"op": "eof"})))
feeding.start()  # 512 KiB, held at first: the command does not exist yet
op.start()
print("done" if op.done.wait(20) else "hung", flush=True)
""")
    assert out == "done\n"


def test_input_to_a_command_that_never_reads_it_holds_neither_the_port_nor_its_timeout() -> None:
    """`exec -i VM --timeout 1 -- sleep 30 < 4MiB`: the port's reader used to write the input
    itself and hung in that write; the timeout was never armed, the port never read again.
    Now the command times out, the reader is released and the input dropped."""
    out = _agent("""
op = run({"argv": ["sleep", "30"], "timeout": 1})
op.start()
started = time.monotonic()
feeding = threading.Thread(target=lambda: feed(op, 128), daemon=True)  # 4 MiB
feeding.start()
feeding.join(15)
op.done.wait(15)
time.sleep(0.2)
print("reader free" if not feeding.is_alive() else "reader held", "done" if op.done.is_set() else "running",
      "timed out" if op.timed_out else "not timed out", round(time.monotonic() - started) < 8, flush=True)
""")
    assert out == "reader free done timed out True\n"


def test_input_to_a_command_that_never_reads_it_ends_when_its_client_goes() -> None:
    """The same without a timeout: the client gives up (Ctrl-C). The reader, held by the full
    input queue, cannot read the port's hang-up; it looks for it while it waits."""
    out = _agent("""
op = run({"argv": ["sleep", "30"]})
op.start()
feeding = threading.Thread(target=lambda: feed(op, 128), daemon=True)
feeding.start()
time.sleep(1)
assert feeding.is_alive()  # held back: the command takes no input
host.shutdown(socket.SHUT_RDWR)
feeding.join(10)
print("reader free" if not feeding.is_alive() else "reader held", "ended" if op.done.wait(10) else "running",
      flush=True)
""")
    assert out == "reader free ended\n"


def test_input_arrives_in_order_around_the_start_of_the_command() -> None:
    """Input that arrives before the command exists waits; input arriving while that is written
    must not overtake it (a `cp` of 20 MB once reached the guest with 64 KiB chunks swapped)."""
    out = _agent("""
import hashlib
op = run({"argv": ["sha256sum"]})
chunks = [bytes([n]) * 50000 for n in range(40)]
def send(part):
    for c in part:
        op.feed({"op": "stdin", "data": base64.b64encode(c).decode()})
early = threading.Thread(target=send, args=(chunks[:20],))
early.start()
time.sleep(0.2)
op.start()
early.join()
send(chunks[20:])
op.feed({"op": "eof"})
op.done.wait(20)
time.sleep(0.2)
host.shutdown(socket.SHUT_RDWR)
reading.join(5)
from mvm.guest import protocol
msgs = [protocol.decode(line) for line in protocol.LineBuffer().feed(b"".join(replies))]
out = b"".join(base64.b64decode(m["data"]) for m in msgs if m.get("event") == "stdout")
print(out.split()[0].decode() == hashlib.sha256(b"".join(chunks)).hexdigest(), msgs[-1], flush=True)
""")
    assert out == "True {'ok': True, 'exit': 0, 'id': 1}\n"


def test_input_for_an_ended_command_is_dropped_not_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a command has ended, input for it (`yes | exec -i VM -- head -1`) neither waits
    nor fills memory: feed returns at once."""
    op = execstream.StreamOp(conn=None, req={"id": 1}, server=None)  # type: ignore[arg-type]
    op.done.set()
    started = time.monotonic()
    for _ in range(execstream.INPUT_QUEUE * 2):
        op.feed({"op": "stdin", "data": base64.b64encode(b"y\n").decode()})
    assert time.monotonic() - started < 1 and op._input.empty()


def test_the_writer_closes_the_commands_input_once_and_stops_at_the_end() -> None:
    op = execstream.StreamOp(conn=None, req={"id": 1}, server=None)  # type: ignore[arg-type]
    r, w = os.pipe()
    op._start_input(w)
    op.feed({"op": "stdin", "data": base64.b64encode(b"abc").decode()})
    op.feed({"op": "eof"})
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"abc"  # end of input: the writer closed its side
    op._end_input()
    assert op._writer is not None and not op._writer.is_alive()
    with pytest.raises(OSError):
        os.fstat(w)




def test_a_command_ended_by_its_timeout_gets_sigterm_first_then_sigkill(tmp_path: Path) -> None:
    """SIGTERM first lets a command clean up (a `cp` cut short removes its partial file); one
    that ignores it is killed KILL_GRACE seconds later."""
    mark = tmp_path / "termed"
    out = _agent(f"""
op = run({{"argv": ["sh", "-c", "trap 'echo termed > {mark}; exit 3' TERM; while :; do sleep 0.05; done"],
          "timeout": 0.5}})
op.start()
print(op.done.wait(15), op.timed_out, flush=True)
op = run({{"argv": ["sh", "-c", "trap '' TERM; sleep 30"], "timeout": 0.5}})
started = time.monotonic()
op.start()
print(op.done.wait(15), op.timed_out, round(time.monotonic() - started) < 8, flush=True)
""")
    assert out == "True True\nTrue True True\n"
    assert mark.read_text() == "termed\n"


def test_a_cp_ended_by_sigterm_leaves_no_partial_file(tmp_path: Path) -> None:
    """The guest's copy helper mid-file when its client goes away (the agent's SIGTERM): the
    file it was to replace is as it was, and no hidden `.mvm-cp-PID` is left beside it."""
    import signal

    from .cp_streams import one_file

    stream = one_file(b"x" * (4 << 20))
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    agent_root = Path(execstream.__file__).parents[2]
    helper = subprocess.Popen(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); from mvm.guest.copy import main; "
         "sys.exit(main(sys.argv[2:]))", str(agent_root), "in", str(target), "file", "data.bin", "0", "0"],
        stdin=subprocess.PIPE)
    assert helper.stdin is not None
    helper.stdin.write(stream[: 1 << 20])  # a quarter of the file, then nothing more
    helper.stdin.flush()
    deadline = time.monotonic() + 10
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".mvm-cp-")] and time.monotonic() < deadline:
        time.sleep(0.02)
    helper.send_signal(signal.SIGTERM)
    assert helper.wait(10) == 128 + signal.SIGTERM
    helper.stdin.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"] and target.read_bytes() == b"old"


def test_an_ended_command_leaves_no_member_of_its_group_that_ignores_sigterm(tmp_path: Path) -> None:
    """The leader gone, a member ignoring SIGTERM lived on (the SIGKILL was only for a live leader)."""
    pid_file = tmp_path / "member"
    out = _agent(f"""
op = run({{"argv": ["sh", "-c", "sh -c 'trap \\"\\" TERM; echo $$ > {pid_file}; exec sleep 30' & sleep 30"],
          "timeout": 1}})
op.start()
op.done.wait(15)
time.sleep({execstream.KILL_GRACE} + 1)
print(op.timed_out, flush=True)
""")
    member = int(pid_file.read_text())
    try:
        with open(f"/proc/{member}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert out == "True\n" and state in ("gone", "Z"), state


def test_a_command_gets_one_sigterm_however_often_it_is_ended(tmp_path: Path) -> None:
    """Each leftover input of a gone client ended the command again: 8 SIGTERMs for one exec,
    and a second SIGTERM is "quit now, skip the clean-up" to many programs."""
    count = tmp_path / "terms"
    out = _agent(f"""
op = run({{"argv": ["sh", "-c", "trap 'echo term >> {count}' TERM; while :; do sleep 0.05; done"]}})
op.start()
time.sleep(0.5)
for _ in range(3):
    op.abandon()
print(op.done.wait(15), flush=True)
""")
    assert out == "True\n" and count.read_text() == "term\n"


def test_malformed_input_is_dropped_and_the_writer_goes_on() -> None:
    """A resize out of range or input that is not base64 killed the writer: the queue filled
    and the port's reader was held until the command ended (a console, never)."""
    out = _agent("""
op = run({"argv": ["cat"]})
op.start()
op.feed({"op": "stdin", "data": "not base64!"})
op.feed({"op": "stdin", "data": base64.b64encode(b"fine").decode()})
op.feed({"op": "eof"})
first = op.done.wait(15)
tty = run({"argv": ["sh", "-c", "read line; echo got $line"], "tty": True})
tty.start()
tty.feed({"op": "resize", "rows": 70000, "cols": None})
feed(tty, 40, size=10)  # more than the queue holds: the writer must be taking them
tty.feed({"op": "stdin", "data": base64.b64encode(b"\\n").decode()})
print(first, tty.done.wait(15), flush=True)
host.shutdown(socket.SHUT_RDWR)
reading.join(5)
from mvm.guest import protocol
msgs = [protocol.decode(line) for line in protocol.LineBuffer().feed(b"".join(replies))]
print(b"".join(base64.b64decode(m["data"]) for m in msgs if m.get("event") == "stdout" and m.get("id") == 1)[:4])
""")
    assert out.splitlines()[0] == "True True" and "fine" in out.splitlines()[1]


def test_a_new_client_is_not_glued_to_the_partial_line_a_cut_off_client_left() -> None:
    """Ctrl-C amid `exec -i` input left half a message in the port; the next client's request
    was glued to it, a malformed line answered without an id, and that client waited for ever.
    The host now starts each connection with a newline, which ends the partial line."""
    import socket as socket_mod

    from mvm.guest import protocol
    from mvm.paths import VMFiles
    from mvm.runtime.agent import AgentSession

    host, guest = socket_mod.socketpair()
    with host, guest:
        session = AgentSession(VMFiles(Path("/nonexistent")), "vm")
        session._sock, session._fresh = host, True  # as _try_port leaves a new connection
        cut_off = b'{"op":"stdin","id":"old","data":"AAAA'  # what the last client sent before it died
        session.send({"op": "ping", "id": "new"})
        session.send({"op": "status", "id": "next"})
        session._sock = None  # (the socket pair closes itself)
        buf = protocol.LineBuffer()
        lines = buf.feed(cut_off) + buf.feed(guest.recv(65536))
    requests = []
    for line in lines:
        try:
            requests.append(protocol.decode(line)["id"])
        except ValueError:
            requests.append("malformed")
    assert requests == ["malformed", "new", "next"]  # the leftover alone is lost; the requests are whole


def test_a_process_left_in_the_background_does_not_stream_to_later_clients(tmp_path: Path) -> None:
    """`exec VM -- sh -c 'loop &'`: the pump kept sending the loop's output, under the ended
    op's id, to every later client of the port (10,000 of them end a session)."""
    pid_file = tmp_path / "bg"
    out = _agent(f"""
op = run({{"argv": ["sh", "-c", "sh -c 'echo $$ > {pid_file}; while :; do echo bg; sleep 0.05; done' &"]}})
op.start()
op.done.wait(15)
time.sleep(1.5)
host.shutdown(socket.SHUT_RDWR)
reading.join(5)
from mvm.guest import protocol
msgs = [protocol.decode(line) for line in protocol.LineBuffer().feed(b"".join(replies))]
final = next(i for i, m in enumerate(msgs) if "ok" in m)
print(final == len(msgs) - 1, msgs[final], flush=True)
""")
    assert out == "True {'ok': True, 'exit': 0, 'id': 1}\n"
    member = int(pid_file.read_text())
    time.sleep(0.5)
    try:
        with open(f"/proc/{member}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), state  # its output closed: the loop ended on EPIPE
