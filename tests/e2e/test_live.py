"""Issue 3: health checks, supervision, and live control (status, wait, forward, exec, console)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import select
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from .conftest import CLI, EXAMPLES, FIXTURES, ROOT, check, free_port, http_get, service, wait_for


def _status(cli: CLI, name: str) -> dict[str, Any]:
    return cli.json("status", name)


def test_exec_exit_codes_streams_and_options(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    r = cli("exec", "shared", "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = cli("exec", "shared", "--user", "mvm", "-w", "/tmp", "-e", "GREETING=a b  'c' $(x)", "--",
            "sh", "-c", 'id -un; pwd; printf "%s" "$GREETING"')
    assert r.stdout == "mvm\n/tmp\na b  'c' $(x)"  # argv and env arrive literally: no shell on the way
    r = cli("exec", "shared", "-i", "--", "tr", "a-z", "A-Z", input="piped stdin\n")
    assert r.stdout == "PIPED STDIN\n"
    # as docker exec: 127 for a command that is not there, 126 for a user or dir that is not
    r = cli("exec", "shared", "--", "no-such-command", check=False)
    assert (r.returncode, r.stderr.strip()) == (127, "mvm exec: no-such-command: command not found (not on the "
                                                "guest's PATH; is its package in the spec's packages?)")
    r = cli("exec", "shared", "--", "/etc/passwd", check=False)
    assert (r.returncode, r.stderr.strip()) == (126, "mvm exec: /etc/passwd: permission denied (is it "
                                                "executable, and readable by the user?)")
    cli("exec", "shared", "--", "sh", "-c", "echo text > /tmp/notaprog && chmod +x /tmp/notaprog")
    r = cli("exec", "shared", "--", "/tmp/notaprog", check=False)
    assert r.returncode == 126 and "/tmp/notaprog: cannot execute: not a program" in r.stderr, r.stderr
    # files the guest rewrites at boot have their own mode, whatever the build host's copies had
    r = cli("exec", "shared", "--", "stat", "-c", "%a", "/etc/hostname", "/etc/resolv.conf", "/etc/hosts")
    assert r.stdout.split() == ["644", "644", "644"]
    assert cli("exec", "shared", "-u", "1000", "--", "id", "-un").stdout == "mvm\n"  # a uid, as docker exec -u
    r = cli("exec", "shared", "--user", "nosuchuser", "--", "id", check=False)
    assert r.returncode == 126
    assert r.stderr.strip() == "mvm exec: no user 'nosuchuser' in the guest (not in its /etc/passwd)"
    r = cli("exec", "shared", "-w", "/nonexist", "--", "true", check=False)
    assert (r.returncode, r.stderr.strip()) == (126, "mvm exec: no directory '/nonexist' in the guest to run in")


def test_exec_timeout_kills_the_guest_process(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    started = time.monotonic()
    r = cli("exec", "shared", "--timeout", "1", "--", "sleep", "30", check=False)
    elapsed = time.monotonic() - started
    assert r.returncode == 124
    assert "timed out after 1s" in r.stderr
    assert elapsed < 10
    ps = cli("exec", "shared", "--", "ps", "-eo", "args").stdout
    assert "sleep 30" not in ps
    # 0 is no limit, as for timeout(1) (it was refused with "must be more than 0 seconds")
    assert cli("exec", "shared", "--timeout", "0", "--", "sh", "-c", "sleep 1.5; echo done").stdout == "done\n"


def test_status_and_ls_show_services_and_health(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    st = _status(cli, "shared")
    web = service(st, "web")
    assert web["state"] == "running" and web["user"] == "mvm" and web["restarts"] == 0
    assert isinstance(web["pid"], int) and web["uptime"] >= 0
    assert check(st, "web")["state"] == "healthy" and check(st, "web")["last_exit"] == 0
    assert check(st, "sick")["state"] == "healthy"
    row = next(r for r in cli.json("ls") if r["name"] == "shared")
    assert row["health"] == "healthy"
    assert "shared" in cli("ls", "-q").stdout.splitlines()  # names alone, for scripts
    assert row["image"] in cli("images", "-q").stdout.splitlines()
    table = cli("status", "shared").stdout
    assert "web" in table and "healthy" in table
    # the root preStart's files are the service's (marked with its run's group, then handed
    # over); root's own /tmp entries and the preStart's mark do not show anywhere else
    owners = cli("exec", "shared", "--", "stat", "-c", "%U:%G %n", "/tmp/www", "/tmp/www/index.html", "/tmp").stdout
    assert owners.splitlines() == ["mvm:mvm /tmp/www", "mvm:mvm /tmp/www/index.html", "root:root /tmp"], owners


def test_killed_service_is_restarted(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    old_pid = service(_status(cli, "shared"), "web")["pid"]
    cli("exec", "shared", "--", "kill", "-9", str(old_pid))
    st = wait_for(
        lambda: service(s := _status(cli, "shared"), "web")["restarts"] == 1
        and service(s, "web")["state"] == "running" and s,
        30, "the web service to be restarted",
    )
    assert service(st, "web")["pid"] != old_pid
    assert service(st, "web")["last_exit"] == -9
    assert http_get(testbed_vm["port"]) == "testbed\n"
    logs = cli("logs", "shared", "--no-console").stdout
    assert "[service web] backoff (killed by SIGKILL, delay 0.5)" in logs


def test_forward_adds_a_port_to_a_running_vm(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    port = free_port()
    r = cli("forward", "shared", "-p", f"{port}:8080")
    assert f"127.0.0.1:{port} -> guest 8080/tcp" in r.stdout
    assert http_get(port) == "testbed\n"
    row = next(r for r in cli.json("ls") if r["name"] == "shared")
    assert {"host_ip": "127.0.0.1", "host_port": port, "guest_port": 8080, "proto": "tcp"} in row["ports"]
    dup = cli("forward", "shared", "-p", f"{port}:8080", check=False)
    assert dup.returncode == 1 and "already forwarded" in dup.stderr
    busy = cli("forward", "shared", "-p", f"{testbed_vm['port']}:9999", check=False)
    assert busy.returncode == 1 and "already forwarded" in busy.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = cli("forward", "shared", "-p", f"{taken}:8080", check=False)
    assert r.returncode == 1 and "is not available" in r.stderr


def test_console_gives_an_interactive_shell(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "mvm", "console", "shared"], cli.env)
    seen = b""

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break

    read_until(b"root@shared")  # the prompt (hostname = VM name); typing before it may be lost
    os.write(fd, b"echo answer-$((6*7)); tty\n")
    read_until(b"answer-42")
    read_until(b"/dev/pts/")
    os.write(fd, b"exit\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_console_ends_when_its_input_does(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    """A script piped into `console` runs without a terminal, as over ssh, and its end ends
    the shell (it used to hang for ever: the shell on a pseudo-terminal never saw the end)."""
    r = cli("console", "shared", input="echo piped-$((6*7)); tty; exit 5\n", timeout=60, check=False)
    assert r.returncode == 5 and r.stdout == "piped-42\nnot a tty\n", (r.returncode, r.stdout, r.stderr)
    assert cli("console", "shared", input="", timeout=60).returncode == 0


def test_cp_both_ways_and_to_stdout(cli: CLI, testbed_vm: dict[str, Any], tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "css").mkdir(parents=True)
    (site / "index.html").write_text("<h1>copied</h1>\n")
    (site / "css" / "a.css").write_text("body {}\n")
    os.chmod(site / "index.html", 0o640)
    cli("cp", str(site), "shared:/tmp/")
    assert cli("exec", "shared", "--", "stat", "-c", "%a %U %n", "/tmp/site/index.html").stdout == \
        "640 root /tmp/site/index.html\n"
    cli("cp", "shared:/tmp/site/.", str(tmp_path / "back"))
    assert (tmp_path / "back" / "css" / "a.css").read_text() == "body {}\n"
    assert (tmp_path / "back" / "index.html").stat().st_mode & 0o777 == 0o640
    listing = subprocess.run([sys.executable, "-m", "mvm", "cp", "shared:/tmp/site", "-"], env=cli.env,
                             capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
        assert sorted(tar.getnames()) == ["site", "site/css", "site/css/a.css", "site/index.html"]
    assert not (Path.cwd() / "-").exists()
    # into a guest directory that is not there: said, with how to make it
    r = cli("cp", str(site / "index.html"), "shared:/nonexist/dir/", check=False)
    assert r.returncode == 1 and "/nonexist/dir/ does not exist" in r.stderr, r.stderr
    assert "hint: make it first: mvmctl exec shared -- mkdir -p /nonexist/dir" in r.stderr
    r = cli("cp", str(site / "index.html"), "shared:/nonexist/a.html", check=False)
    assert r.returncode == 1 and "hint: make it first: mvmctl exec shared -- mkdir -p /nonexist" in r.stderr
    # /etc/os-release is a link out of /etc (../usr/lib/os-release): refused as sent, -L follows it
    r = cli("cp", "shared:/etc/os-release", str(tmp_path / "os"), check=False)
    assert r.returncode == 1 and "cp -L" in r.stderr, r.stderr
    cli("cp", "-L", "shared:/etc/os-release", str(tmp_path / "os"))
    assert "ID=debian" in (tmp_path / "os").read_text()
    # and a tar archive from stdin, as `docker cp -` takes one
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        for name, data in (("fromtar/a.txt", b"a\n"), ("/fromtar/b.txt", b"b\n")):
            info = tarfile.TarInfo(name)
            info.size, info.uid = len(data), 4242
            tar.addfile(info, io.BytesIO(data))
    cli("exec", "shared", "--", "mkdir", "-p", "/tmp/in")
    r = subprocess.run([sys.executable, "-m", "mvm", "cp", "-", "shared:/tmp/in"], input=packed.getvalue(),
                       env=cli.env, cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = cli("exec", "shared", "--", "sh", "-c", "cat /tmp/in/fromtar/a.txt /tmp/in/fromtar/b.txt; "
              "stat -c %u /tmp/in/fromtar/a.txt").stdout
    assert got == "a\nb\n0\n"  # the leading / dropped; owned by root without -a
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        tar.addfile(info, io.BytesIO(b""))
    r = subprocess.run([sys.executable, "-m", "mvm", "cp", "-", "shared:/tmp/in"], input=evil.getvalue(),
                       env=cli.env, cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 1 and b"would land outside /tmp/in" in r.stderr, r.stderr
    assert cli("exec", "shared", "--", "ls", "/tmp/escaped.txt", check=False).returncode != 0


def test_the_vm_handle_copies_in_and_out(cli: CLI, testbed_vm: dict[str, Any], tmp_path: Path) -> None:
    """`vm.copy_in` / `vm.copy_out`: `mvm.cp` from a VM handle (a test had to spell NAME:/path)."""
    import mvm

    layout = mvm.paths.Layout(state=cli.home / "state", cache=Path(cli.env["MVM_CACHE"]))
    shared = mvm.get("shared", layout=layout)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("copied in\n")
    shared.copy_in(tmp_path / "in", "/tmp/handle")
    assert shared.exec("cat", "/tmp/handle/a.txt").stdout == b"copied in\n"
    assert shared.copy_out("/tmp/handle/a.txt", tmp_path / "out.txt") == []
    assert (tmp_path / "out.txt").read_text() == "copied in\n"
    shared.exec("rm", "-r", "/tmp/handle")


def test_large_input_reaches_the_guest_byte_for_byte(cli: CLI, testbed_vm: dict[str, Any], tmp_path: Path) -> None:
    """A 16 MiB `cp` arrived with 64 KiB chunks swapped near its start, in most tries (exit
    0, no warning): input that came while the guest wrote what it had held overtook it.
    Random bytes, so that any reordering changes the hash; `exec -i` shares the path."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(16 << 20))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    for n in range(3):
        cli("cp", str(blob), f"shared:/tmp/blob{n}.bin")
    sums = cli("exec", "shared", "--", "sh", "-c", "sha256sum /tmp/blob*.bin; rm /tmp/blob*.bin").stdout
    assert [line.split()[0] for line in sums.splitlines()] == [want] * 3
    piped = subprocess.run([sys.executable, "-m", "mvm", "exec", "-i", "shared", "--", "sha256sum"],
                           input=blob.read_bytes()[: 4 << 20], env=cli.env, capture_output=True, timeout=120)
    assert piped.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()[: 4 << 20]).hexdigest()
    # a command that echoes its input: the input held before it started must not block on its
    # full stdout (it hung the port for good)
    echoed = subprocess.run([sys.executable, "-m", "mvm", "exec", "-i", "shared", "--timeout", "60", "--", "cat"],
                            input=blob.read_bytes()[: 4 << 20], env=cli.env, capture_output=True, timeout=120)
    assert echoed.returncode == 0 and echoed.stdout == blob.read_bytes()[: 4 << 20], echoed.stderr


def test_input_to_a_command_that_never_reads_it_neither_hangs_nor_holds_the_port(cli: CLI,
                                                                                 testbed_vm: dict[str, Any]) -> None:
    """`exec -i VM --timeout 3 -- sleep 60 < 4MiB`: the agent's port reader wrote the input
    itself, hung in that write for good, and `--timeout` never fired (it was armed after the
    held input went in). Now it times out (124) and the port serves the next commands."""
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mvm", "exec", "-i", "shared", "--timeout", "3", "--", "sleep", "60"],
                       input=os.urandom(4 << 20), env=cli.env, capture_output=True, timeout=120)
    assert r.returncode == 124 and b"timed out" in r.stderr, r.stderr
    assert time.monotonic() - started < 45  # not the 60 s of its sleep (a slow CI's TCG start included)
    for _ in range(4):  # the next clients take the port the timed-out exec held
        assert cli("exec", "shared", "--", "echo", "hi").stdout == "hi\n"


def test_an_exec_cut_short_does_not_hold_up_the_next(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    """`exec ... | head` ended the client while the guest still ran its command on that agent
    port: the next exec got the old output and a refusal, and printed nothing (exit 1)."""
    exec_ = subprocess.Popen([sys.executable, "-m", "mvm", "exec", "shared", "--", "seq", "1", "2000000"],
                             env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert exec_.stdout is not None
    assert exec_.stdout.read(5) == b"1\n2\n3"
    exec_.stdout.close()  # as `| head -c5` does
    assert exec_.wait(timeout=60) == 120
    r = cli("exec", "shared", "--", "sh", "-c", "echo hello; exit 4", check=False)
    assert (r.returncode, r.stdout) == (4, "hello\n"), (r.returncode, r.stdout, r.stderr)


def test_up_wait_returns_once_healthy_after_grace(cli: CLI, testbed_image: dict[str, Any]) -> None:
    started = time.monotonic()
    r = cli("up", str(FIXTURES / "testbed"), "--name", "slowstart", "-e", "WEB_DELAY=4", "--wait",
            "--timeout", "90", check=False)
    try:
        assert r.returncode == 0, r.stderr
        assert "and healthy" in r.stderr
        assert time.monotonic() - started > 4
        st = _status(cli, "slowstart")
        assert check(st, "web")["state"] == "healthy"
    finally:
        cli("down", "slowstart")


def test_failing_check_turns_unhealthy_and_wait_names_it(cli: CLI, testbed_image: dict[str, Any]) -> None:
    # --timeout leaves room for a loaded host's first probe (5.6 s seen in CI): the message below
    # must name the check as unhealthy, not still starting
    r = cli("up", str(FIXTURES / "testbed"), "--name", "sickly", "-e", "SICK=disk on fire", "--wait",
            "--timeout", "15", check=False)
    try:
        assert r.returncode == 1
        assert "not healthy after 15s: sick is unhealthy (last exit 3, output: 'sick: disk on fire')" in r.stderr
        assert "left running for inspection" in r.stderr
        row = next(x for x in cli.json("ls") if x["name"] == "sickly")
        assert row["status"] == "running" and row["health"] == "unhealthy"
        events = [json.loads(line) for line in (cli.vms / "sickly" / "events.log").read_text().splitlines()]
        first = next(e for e in events if e.get("kind") == "health" and e["check"] == "sick")
        # No grace: the first failed run turns it unhealthy. (Counted in runs, not seconds: a
        # wall-clock bound failed CI when a loaded host took 5.6 s to run the first probe.)
        assert (first["state"], first["failures"]) == ("unhealthy", 1)
        assert "[health sick] unhealthy (exit 3): sick: disk on fire" in cli("logs", "sickly").stdout
    finally:
        cli("down", "sickly")


def test_a_missing_program_fails_the_service_at_once(cli: CLI, testbed_image: dict[str, Any]) -> None:
    # known from the first run: no waiting for a crash loop (five restarts) to show
    started = time.monotonic()
    r = cli("up", str(FIXTURES / "testbed"), "--name", "noprog", "-e", "WEB_PROG=no-such-prog", "--wait",
            "--timeout", "60", check=False)
    try:
        assert r.returncode == 1, r.stderr
        assert "service web keeps failing: command not found (exit 127): add the program's package to packages" \
            in r.stderr, r.stderr
        assert "no-such-prog" in r.stderr  # the service's last log line says which program
        assert time.monotonic() - started < 45, "it waited for the timeout instead of failing at once"
        web = next(s for s in _status(cli, "noprog")["guest"]["services"] if s["name"] == "web")
        # still restarted per its policy (the program may arrive), with the reason kept
        assert web["state"] in ("backoff", "running") and web["last_exit"] == 127, web
        assert web["reason"].startswith("command not found (exit 127)"), web
    finally:
        cli("down", "noprog")


def test_a_missing_program_fails_up_wait_without_health_checks(cli: CLI, tmp_path: Path) -> None:
    """No health check to fail: `sh -c` is "running" before it finds its program missing, and
    `up --wait` called the VM up (hands-on: 4 of 4 API ups, and a pytest fixture that passed)."""
    (tmp_path / "mvm.toml").write_text('name = "nocheck"\npackages = ["python3", "curl"]\n'
                                       '[services.web]\ncommand = "no-such-prog --serve"\n')
    r = cli("up", str(tmp_path), "--wait", "--timeout", "60", "--json", check=False)
    try:
        assert r.returncode == 1, r.stderr
        assert "service web keeps failing: command not found (exit 127)" in r.stderr, r.stderr
        left = json.loads(r.stdout)  # with --json, what was kept for inspection (a script can down it)
        assert (left["name"], left["status"], left["failing"]) == ("nocheck", "running", ["web"])
    finally:
        cli("down", "nocheck")
    cli("rmi", "nocheck")


def test_stack_example_serves_data_through_redis(cli: CLI) -> None:
    port = free_port()
    cli("up", str(EXAMPLES / "stack"), "-p", f"{port}:8080", "--wait", "--timeout", "120")
    try:
        first = json.loads(http_get(port))
        second = json.loads(http_get(port))
        assert first["store"] == "redis" and second["visits"] == first["visits"] + 1
        stored = cli("exec", "stack", "--", "redis-cli", "GET", "visits").stdout.strip()
        assert int(stored) == second["visits"]
        st = _status(cli, "stack")
        assert {s["name"] for s in st["guest"]["services"]} == {"redis", "api"}
        assert check(st, "api")["state"] == "healthy"
    finally:
        cli("down", "stack")


def test_agent_refuses_unknown_verbs(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    code = (
        "import mvm; from mvm.runtime import agent; vm = mvm.get('shared');\n"
        "try:\n agent.request(vm.files, 'shared', 'reboot_host')\nexcept mvm.AgentError as e: print(e)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=cli.env, capture_output=True, text=True, check=True)
    assert "unknown op 'reboot_host'" in r.stdout


def test_logs_follow_shows_new_lines_live(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mvm", "logs", "shared", "-f", "-n", "1"], env=cli.env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        marker = f"/follow-{time.time_ns()}"
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"http://127.0.0.1:{testbed_vm['port']}{marker}", timeout=10).close()
        except urllib.error.HTTPError as err:  # a 404 is fine: the request line is what we look for
            err.close()
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        seen = ""
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                seen += proc.stdout.readline()
        assert marker in seen, seen
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode in (143, -15)


def test_the_guest_clock_stays_with_the_host_next_to_a_busy_vm(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    """Set at boot from a fresh ping (not one that waited in the socket), and kept: after
    half a minute of idling while another VM keeps a core busy, still within 100 ms (a drift
    of 0.3 % would show; the suite's 20 minutes could not spare the minute this waited)."""
    import mvm

    layout = mvm.paths.Layout(state=cli.home / "state", cache=Path(cli.env["MVM_CACHE"]))
    shared = mvm.get("shared", layout=layout)
    assert abs(shared.clock_offset()) < 0.1
    cli("up", str(EXAMPLES / "hello"), "--name", "busy")
    try:
        cli("exec", "busy", "--", "sh", "-c", "(while :; do :; done) >/dev/null 2>&1 &")
        time.sleep(30)
        # one round trip's offset is uncertain by half of it (a loaded host delays some): the
        # sample with the shortest round trip counts, allowed that uncertainty on top
        samples = []
        for _ in range(5):
            began = time.monotonic()
            offset = shared.clock_offset()
            samples.append((time.monotonic() - began, offset))
        rtt, offset = min(samples)
        assert abs(offset) < 0.1 + rtt / 2, samples
    finally:
        cli("down", "busy")


def test_the_guest_clock_catches_up_after_the_vm_was_paused(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    """A paused guest's clock stands still (a host suspend, a platform pausing the host: this
    suite once saw a guest 68.8 s behind). PID 1 compares it with the RTC, which reads the
    host's clock, every 10 s, and sets it."""
    import mvm
    from mvm.backends.qmp import QMP

    layout = mvm.paths.Layout(state=cli.home / "state", cache=Path(cli.env["MVM_CACHE"]))
    shared = mvm.get("shared", layout=layout)
    with QMP(shared.files.qmp, "shared") as qmp:
        qmp.command("stop")
        time.sleep(5)
        qmp.command("cont")
    offsets = [round(shared.clock_offset(), 3)]
    assert offsets[0] < -4  # the pause shows (else this test proves nothing)

    def caught_up() -> bool:
        offsets.append(round(shared.clock_offset(), 3))
        return abs(offsets[-1]) < 0.5

    try:
        wait_for(caught_up, timeout=30, what="the guest clock to catch up")
    except AssertionError:
        said = [line for line in cli("logs", "shared").stdout.splitlines() if "clock: " in line]
        raise AssertionError(f"offsets {offsets[:3]} ... {offsets[-3:]}; the guest said {said[-3:]}") from None
    said = [line for line in cli("logs", "shared").stdout.splitlines() if "clock: " in line]
    assert said and "behind the host's" in said[-1], said


def test_forward_rm_closes_the_port(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    import socket

    port = free_port()
    cli("forward", "shared", "-p", f"{port}:8080")
    assert http_get(port) == "testbed\n"
    cli("forward", "shared", "--rm", "-p", f"{port}:8080")
    row = next(r for r in cli.json("ls") if r["name"] == "shared")
    assert port not in {p["host_port"] for p in row["ports"]}
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as s:  # and the port can be had again (the old connection may sit in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    assert http_get(testbed_vm["port"]) == "testbed\n"  # the VM's own forward stays


def test_stats_measure_the_vm_and_its_services(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    [usage] = cli.json("stats", "shared", "--interval", "0.5")
    assert usage["name"] == "shared"
    assert 50 << 20 < usage["memory_bytes"] < 4 << 30  # QEMU's resident memory: a booted guest's, at least
    assert 0 <= usage["cpu_percent"] <= 100 * (os.cpu_count() or 1)
    assert 0 < usage["guest_memory_used"] < usage["guest_memory_total"] <= 512 << 20
    web = next(s for s in usage["services"] if s["name"] == "web")
    assert web["memory_bytes"] > 5 << 20 and web["pid"] == service(_status(cli, "shared"), "web")["pid"]


def test_logs_since_leaves_out_what_came_before(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    everything = cli("logs", "shared", "--since", "1h").stdout
    assert "[service web] running" in everything
    time.sleep(1.5)
    assert "[service web]" not in cli("logs", "shared", "--since", "1s").stdout


def test_cold_up_restart_power_off_and_logs_after_down(cli: CLI, testbed_image: dict[str, Any]) -> None:
    """`up --cold` boots; `restart` keeps ports and -e values; a power-off from inside the
    guest shows as exited (not crashed); `logs` still reads the VM after `down`."""
    port = free_port()
    info = cli.json("up", str(FIXTURES / "testbed"), "--name", "life", "--cold", "-e", "SICK=",
                    "-e", "WEB_DELAY=0", "-p", f"{port}:8080", "--wait", "--timeout", "120")
    try:
        assert (info["start"], info["start_reason"]) == ("cold", "--cold")
        first_pid = info["pid"]
        restarted = cli.json("restart", "life", "--wait", "--timeout", "120")
        assert restarted["pid"] != first_pid and sorted(restarted["env_keys"]) == ["SICK", "WEB_DELAY"]
        assert [p["host_port"] for p in restarted["ports"]] == [port]
        assert http_get(port) == "testbed\n"
        cli("exec", "life", "--", "sh", "-c", "kill -TERM 1")  # what busybox poweroff asks of PID 1
        row = wait_for(lambda: (r := next(x for x in cli.json("ls") if x["name"] == "life"))["status"] != "running"
                       and r, 60, "the guest to power off")
        assert row["status"] == "exited", row
    finally:
        cli("down", "life")
    kept = cli("logs", "life").stdout
    assert "[service web] running" in kept and "powering off" in kept


def test_a_port_refuses_at_once_until_the_guest_answers(cli: CLI, testbed_image: dict[str, Any]) -> None:
    """README: -p forwards open once the guest answers; a connection made while it boots is
    refused at once, never left hanging in QEMU's user network."""
    import socket

    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "mvm", "up", str(FIXTURES / "testbed"), "--name", "early",
                           "--cold", "-p", f"{port}:8080"], env=cli.env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    refused = 0
    try:
        while up.poll() is None:
            with socket.socket() as s:
                s.settimeout(5)
                began = time.monotonic()
                try:
                    s.connect(("127.0.0.1", port))
                except ConnectionRefusedError:
                    assert time.monotonic() - began < 1.0, "a refusal that took its time"
                    refused += 1
                    time.sleep(0.05)
                    continue
                except TimeoutError:
                    raise AssertionError("a connection made while the guest booted hung") from None
            break  # connected: the forward is open, so the guest has answered
        _, err = up.communicate(timeout=120)
        assert up.returncode == 0, err
        assert refused > 0, "no connection was tried before the forward opened: the check saw nothing"
        assert http_get(port) == "testbed\n"
    finally:
        if up.poll() is None:
            up.wait(timeout=120)
        cli("down", "early")


def test_down_all_stops_every_vm_of_its_home(cli: CLI, testbed_image: dict[str, Any], tmp_path: Path) -> None:
    """In a home of its own (`--all` here would take the module's shared VM along)."""
    own = {"MVM_HOME": str(tmp_path / "home")}
    for name in ("all-a", "all-b"):
        cli("up", str(FIXTURES / "testbed"), "--name", name, env=own)
    try:
        stopped = json.loads(cli("down", "--all", "--json", env=own).stdout)
        assert sorted(r["name"] for r in stopped) == ["all-a", "all-b"]
        assert all(r["how"] != "not found" for r in stopped), stopped
        assert json.loads(cli("ls", "--json", env=own).stdout) == []
    finally:
        cli("down", "all-a", "all-b", env=own)


def test_input_left_over_by_an_exec_does_not_reach_the_next(cli: CLI, testbed_vm: dict[str, Any]) -> None:
    """`yes | exec -i ... head -1` ends while its stdin still flows: the next command on the
    port must get its own answers (it got 'unknown op' errors for the leftover input)."""
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        r = subprocess.run([sys.executable, "-m", "mvm", "exec", "-i", "shared", "--", "head", "-1"],
                           stdin=yes.stdout, env=cli.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        yes.kill()
        yes.wait()
        assert yes.stdout is not None
        yes.stdout.close()
    assert (r.returncode, r.stdout) == (0, "y\n"), r.stderr
    for _ in range(3):
        assert cli("exec", "shared", "--", "echo", "hi").stdout == "hi\n"
    assert service(_status(cli, "shared"), "web")["state"] == "running"
