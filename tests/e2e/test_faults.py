"""Issue 6: the fault-injection suite. Each scenario injects faults into real VMs and real
builds, checks mvm's reaction, and records the leak figures (all must be 0)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLI, FIXTURES, ROOT, check, free_port, http_get, qemu_pids_under, service, wait_for
from .faults import Recorder, find_leaks

TESTBED = str(FIXTURES / "testbed")


def _leaks(cli: CLI, expected: set[str] = frozenset()) -> dict[str, int]:  # type: ignore[assignment]
    return find_leaks(cli.home, Path(cli.env["MVM_CACHE"]), set(expected))


def _assert_clean(leaks: dict[str, int]) -> None:
    assert not any(leaks.values()), f"leaks: {leaks}"


def _spawn_up(cli: CLI, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mvm", "up", *args], env=cli.env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _row(cli: CLI, name: str) -> dict[str, Any]:
    return next(r for r in cli.json("ls") if r["name"] == name)


def test_kill_9_of_qemu(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder) -> None:
    started = time.monotonic()
    cli("up", TESTBED, "--name", "k9")
    pid = _row(cli, "k9")["pid"]
    os.kill(pid, signal.SIGKILL)
    row = wait_for(lambda: (r := _row(cli, "k9"))["status"] != "running" and r, 10, "ls to notice")
    assert row["status"] == "crashed"
    assert "killed" in row["exit_reason"]
    assert "crashed" in cli("ls").stdout
    status = cli("status", "k9")
    assert "QEMU exited unexpectedly" in status.stdout
    cli("down", "k9")
    cli("up", TESTBED, "--name", "k9")  # the name is usable again
    cli("down", "k9")
    leaks = _leaks(cli)
    recorder.add("kill -9 of QEMU", "ls shows crashed + reason; down cleans; the name is reusable", 1, leaks,
                 started=started)
    _assert_clean(leaks)


def _interrupt_up(cli: CLI, args: list[str], wait_for_line: str | None, sig: int, delay: float) -> int:
    proc = _spawn_up(cli, *args)
    assert proc.stderr is not None
    if wait_for_line:
        for line in proc.stderr:
            if wait_for_line in line:
                break
        else:
            raise AssertionError(f"`up` ended before printing {wait_for_line!r}")
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)  # also closes the pipes
    if proc.returncode == 128 + sig:
        assert "interrupted: what it had started and not finished is undone" in err, err
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_during_up(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder, tmp_path: Path,
                           sig: int) -> None:
    started = time.monotonic()
    # a spec nobody built yet, and no cached package layer for it, so `up` is interrupted
    # inside mmdebstrap
    (tmp_path / "mvm.toml").write_text(f'name = "fresh"\npackages = ["jq"]\nhostname = "h{time.time_ns()}"\n')
    for layer in Path(cli.env["MVM_CACHE"], "layers").glob("*/layer.json"):
        if "jq" in json.loads(layer.read_text()).get("packages", []):
            shutil.rmtree(layer.parent)
    points = [
        ([str(tmp_path)], "installing packages", 4.0, "during the image build (mmdebstrap)"),
        ([TESTBED, "--name", "sig1"], "booting", 0.0, "right after QEMU starts"),
        ([TESTBED, "--name", "sig2"], "waiting for the guest agent", 0.7, "while waiting for the agent"),
    ]
    faults = 0
    for args, line, delay, _ in points:
        # off a terminal, `up` prints one plain line per stage
        code = _interrupt_up(cli, args, line, sig, delay)
        faults += 1
        assert code == 128 + sig, f"exit code {code} after {signal.Signals(sig).name}"  # 130, 143
        _assert_clean(_leaks(cli))
    assert not list(Path(cli.env["MVM_CACHE"], "images").glob(".build-*"))
    assert not list(Path(cli.env["MVM_CACHE"], "layers").glob(".build-*"))
    leaks = _leaks(cli)
    name = signal.Signals(sig).name
    recorder.add(f"{name} to `mvmctl up`", "during build, right after QEMU starts, while waiting for the agent: "
                 "exit 130 (143 for SIGTERM), no VM, no half-written image", faults, leaks, started=started)
    _assert_clean(leaks)


def test_concurrent_up_of_one_name(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder) -> None:
    started = time.monotonic()
    procs = [_spawn_up(cli, TESTBED, "--name", "race") for _ in range(8)]
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    results = [(code, err) for err, code in results]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    for code, err in losers:
        assert code == 1 and "a VM named 'race' already exists" in err, err
    assert _row(cli, "race")["status"] == "running"
    leaks = _leaks(cli, {"race"})
    cli("down", "race")
    leaks = {k: v + _leaks(cli)[k] for k, v in leaks.items()}
    recorder.add("8 concurrent `up` of one name", "exactly one wins; 7 get a clear 'already exists'", 8, leaks,
                 started=started)
    _assert_clean(leaks)


def test_five_vms_at_once(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder) -> None:
    started = time.monotonic()
    names = [f"multi{i}" for i in range(5)]
    ports = [free_port() for _ in names]
    procs = [_spawn_up(cli, TESTBED, "--name", n, "-p", f"{p}:8080", "--wait", "--timeout", "300")
             for n, p in zip(names, ports, strict=True)]
    try:
        results = [(p.communicate(timeout=400)[1], p.returncode) for p in procs]
        results = [(code, err) for err, code in results]
        assert all(code == 0 for code, _ in results), results
        rows = {r["name"]: r for r in cli.json("ls")}
        assert all(rows[n]["status"] == "running" and rows[n]["health"] == "healthy" for n in names)
        for port in ports:
            assert http_get(port) == "testbed\n"
    finally:
        cli("down", *names)
    leaks = _leaks(cli)
    recorder.add("5 VMs started concurrently on 2 cores", "all healthy, all serve through their ports", 0, leaks,
                 started=started)
    _assert_clean(leaks)


def test_guest_kernel_panic(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder) -> None:
    started = time.monotonic()
    cli("up", TESTBED, "--name", "panic")
    cli("exec", "panic", "--timeout", "5", "--", "sh", "-c", "echo c > /proc/sysrq-trigger", check=False)
    row = wait_for(lambda: (r := _row(cli, "panic"))["status"] != "running" and r, 30, "the panic to be seen")
    assert row["status"] == "crashed"
    assert "Kernel panic" in row["exit_reason"]
    assert "Kernel panic" in cli("status", "panic").stdout
    assert "sysrq" in cli("logs", "panic", "--no-services").stdout.lower()
    exec_after = cli("exec", "panic", "--", "true", check=False)
    assert exec_after.returncode == 1 and "is crashed" in exec_after.stderr
    cli("down", "panic")
    leaks = _leaks(cli)
    recorder.add("guest kernel panic", "reported as crashed with the panic line; console kept for `logs`", 1,
                 leaks, started=started)
    _assert_clean(leaks)


def test_corrupt_vm_json_and_manifest(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder) -> None:
    started = time.monotonic()
    cli("up", TESTBED, "--name", "corrupt")
    state = cli.vms / "corrupt" / "vm.json"
    state.write_text(state.read_text()[:40])  # truncated mid-write
    ls = cli("ls")
    assert "broken" in ls.stdout and "Traceback" not in ls.stderr
    st = cli("status", "corrupt", check=False)
    assert st.returncode == 1 and str(state) in st.stderr and "is unreadable" in st.stderr
    assert "mvmctl down corrupt" in st.stderr and "Traceback" not in st.stderr
    report = cli.json("cleanup", "--dry-run")
    assert any("corrupt: state is unreadable but its machine is running" in n for n in report["notes"])
    cli("down", "corrupt")  # finds QEMU through its pid file and cwd, and stops it
    faults = 1

    manifest = Path(testbed_image["path"]) / "manifest.json"
    saved = manifest.read_bytes()
    try:
        manifest.write_bytes(saved[: len(saved) // 2])
        for cmd in (["build", TESTBED], ["up", TESTBED, "--name", "nomanifest"]):
            r = cli(*cmd, check=False)
            assert r.returncode == 1 and str(manifest) in r.stderr and "mvmctl cleanup" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            faults += 1
    finally:
        manifest.write_bytes(saved)
    leaks = _leaks(cli)
    recorder.add("corrupted vm.json / manifest.json", "one-line error naming the file + recovery hint; "
                 "down still stops the VM; never a traceback", faults, leaks, started=started)
    _assert_clean(leaks)


def test_hostile_strings_reach_the_guest_literally(cli: CLI, testbed_image: dict[str, Any],
                                                   recorder: Recorder, tmp_path: Path) -> None:
    started = time.monotonic()
    canary = tmp_path / "pwned"
    evil = (f"$(touch {canary}) `touch /tmp/pwned` \"dq\" 'sq' ; touch /tmp/pwned {canary} \\ \n"
            " second line")
    cli("up", TESTBED, "--name", "hostile", "-e", f"EVIL={evil}")
    try:
        pid = service(cli.json("status", "hostile"), "web")["pid"]
        environ = cli("exec", "hostile", "--", "cat", f"/proc/{pid}/environ").stdout
        assert f"EVIL={evil}" in environ.split("\0")
        guest = json.loads(cli("exec", "hostile", "--", "cat", "/etc/mvm/guest.json").stdout)
        spec = tomllib.loads((FIXTURES / "testbed" / "mvm.toml").read_text())
        assert "${WEB_DELAY:-0}" in spec["services"]["web"]["command"]  # $ and braces, as written
        assert guest["services"]["web"]["command"] == spec["services"]["web"]["command"]
        r = cli("exec", "hostile", "--", "printf", "%s", evil)
        assert r.stdout == evil
        probe = cli("exec", "hostile", "--", "sh", "-c", "test -e /tmp/pwned && echo yes || echo no")
        assert probe.stdout.strip() == "no"
    finally:
        cli("down", "hostile")
    assert not canary.exists()
    bad = cli("up", TESTBED, "--name", "x;rm -rf ~", check=False)
    assert bad.returncode == 1 and "not a valid VM name" in bad.stderr
    bad = cli("up", TESTBED, "-e", "A B=1", check=False)
    assert bad.returncode == 1 and "not a valid variable name" in bad.stderr
    leaks = _leaks(cli)
    recorder.add("hostile spec strings", "$(…), backticks, quotes, newlines in env and argv arrive literally; "
                 "no host shell; bad names refused", 5, leaks, started=started)
    _assert_clean(leaks)


def test_security_defaults(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder) -> None:
    started = time.monotonic()
    cli("up", TESTBED, "--name", "secure")
    try:
        vmdir = cli.vms / "secure"
        assert vmdir.stat().st_mode & 0o777 == 0o700
        for f in vmdir.iterdir():
            mode = f.stat().st_mode & 0o777
            assert mode & 0o077 == 0, f"{f.name} is {oct(mode)}"
        pid = _row(cli, "secure")["pid"]
        seccomp = re.search(r"^Seccomp:\s+(\d)", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert seccomp and seccomp.group(1) == "2", "QEMU runs without its seccomp sandbox"
        svc_pid = service(cli.json("status", "secure"), "web")["pid"]
        user = cli("exec", "secure", "--", "ps", "-o", "user=", "-p", str(svc_pid)).stdout.strip()
        assert user == "mvm"
    finally:
        cli("down", "secure")
    leaks = _leaks(cli)
    recorder.add("security defaults", "runtime dir 0700, its files 0600, QEMU seccomp on, services unprivileged",
                 0, leaks, started=started)
    _assert_clean(leaks)


def test_cleanup_frees_dead_state_but_never_running_vms(cli: CLI, testbed_image: dict[str, Any],
                                                       recorder: Recorder) -> None:
    started = time.monotonic()
    cli("up", TESTBED, "--name", "alive")
    cli("up", TESTBED, "--name", "dead")
    os.kill(_row(cli, "dead")["pid"], signal.SIGKILL)
    wait_for(lambda: _row(cli, "dead")["status"] == "crashed", 10, "crash noticed")
    staging = Path(cli.env["MVM_CACHE"]) / "images" / ".build-deadbeef-test"
    staging.mkdir()
    (staging / "rootfs.ext4").write_bytes(b"\0" * 4096)
    try:
        dry = cli.json("cleanup", "--dry-run")
        paths = {i["path"] for i in dry["items"]}
        assert str(cli.vms / "dead") in paths and str(staging) in paths
        assert str(cli.vms / "alive") not in paths
        assert (cli.vms / "dead").exists() and staging.exists()  # dry run changed nothing
        real = cli("cleanup", "--keep", "1000")
        assert "freed" in real.stderr
        assert not (cli.vms / "dead").exists() and not staging.exists()
        assert _row(cli, "alive")["status"] == "running"
        assert cli("exec", "alive", "--", "true").returncode == 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        cli("down", "alive")
    leaks = _leaks(cli)
    recorder.add("`mvmctl cleanup`", "removes dead VM state and interrupted builds; running VMs untouched",
                 1, leaks, started=started)
    _assert_clean(leaks)


def test_doctor_reports_backends_and_tools(cli: CLI, tmp_path: Path) -> None:
    report = cli.json("doctor")
    backends = {b["backend"]: b for b in report["backends"]}
    assert backends["qemu-tcg"]["usable"] is True
    assert isinstance(backends["qemu-kvm"]["reason"], str) and backends["qemu-kvm"]["reason"]
    tools = {t["tool"]: t for t in report["tools"]}
    assert tools["qemu-system-x86_64"]["found"] and re.match(r"\d+\.\d+", tools["qemu-system-x86_64"]["version"])
    assert report["disk"]["state_dir"] == str(cli.home / "state")
    missing = cli("doctor", "--json", check=False, env={"PATH": str(tmp_path)})
    assert missing.returncode == 1
    data = json.loads(missing.stdout)
    qemu = next(t for t in data["tools"] if t["tool"] == "qemu-system-x86_64")
    assert not qemu["found"] and qemu["fix"] == "apt-get install qemu-system-x86"


WRITE_BLOB = (
    "import hashlib, os, sys\n"
    "data = os.urandom(int(sys.argv[2]))\n"
    "with open(sys.argv[1], 'wb') as f:\n"
    "    f.write(data); f.flush(); os.fsync(f.fileno())\n"
    "print(hashlib.sha256(data).hexdigest())\n"
)
READ_BLOB = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def test_data_survives_kill_9_and_down(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder,
                                       tmp_path: Path) -> None:
    """Data the guest fsync'd is on the volume after QEMU is SIGKILLed, and after `down`."""
    started = time.monotonic()
    vol = f"{tmp_path / 'data'}:/mnt/data:64"
    size = 8 << 20
    lost = 0
    for round_, stop in enumerate(("kill -9", "down")):
        cli("up", TESTBED, "--name", "durable", "-v", vol)
        digest = cli("exec", "durable", "--user", "mvm", "--", "python3", "-c", WRITE_BLOB,
                     f"/mnt/data/blob{round_}", str(size)).stdout.strip()
        if stop == "kill -9":
            os.kill(_row(cli, "durable")["pid"], signal.SIGKILL)
            wait_for(lambda: _row(cli, "durable")["status"] == "crashed", 10, "the kill to be seen")
        cli("down", "durable")
        cli("up", TESTBED, "--name", "durable", "-v", vol)
        after = cli("exec", "durable", "--", "python3", "-c", READ_BLOB, f"/mnt/data/blob{round_}", check=False)
        if after.stdout.strip() != digest:
            lost += size
        cli("down", "durable")
    leaks = _leaks(cli)
    recorder.add("fsync'd data vs kill -9 / down", f"an {size >> 20} MiB fsync'd file keeps its checksum after "
                 "QEMU is SIGKILLed, and after down + up", 2, leaks, bytes_lost=lost, started=started)
    assert lost == 0
    _assert_clean(leaks)


def test_a_short_down_keeps_what_was_written_and_names_a_killed_service(cli: CLI, testbed_image: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    """`down --timeout 2` of a VM whose service ignores SIGTERM: the guest spent its 5 s on the
    service, the host quit QEMU at 2 s, and a file written just before (not fsync'd) was gone,
    exit 0. Now the guest syncs first and the services get the timeout less 5 s; a service
    that had to be killed is named."""
    vol = f"{tmp_path / 'data'}:/mnt/data:16"
    cli("up", TESTBED, "--name", "stubborn", "-e", "STUBBORN=1", "-v", vol)
    cli("exec", "stubborn", "--user", "mvm", "--", "sh", "-c", "echo precious > /mnt/data/precious.txt")
    cli("down", "stubborn", "--timeout", "2")
    cli("up", TESTBED, "--name", "stubborn", "-e", "STUBBORN=1", "-v", vol)
    try:
        assert cli("exec", "stubborn", "--", "cat", "/mnt/data/precious.txt").stdout == "precious\n"
    finally:
        [result] = cli.json("down", "stubborn", "--timeout", "7")
    assert result["how"] == "shut down cleanly; web killed after 2s: ignored SIGTERM"
    _assert_clean(_leaks(cli))


def test_full_data_volume(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder, tmp_path: Path) -> None:
    """ENOSPC on one volume reaches the writer; the VM, its services and other volumes stay fine."""
    started = time.monotonic()
    port = free_port()
    cli("up", TESTBED, "--name", "full", "-p", f"{port}:8080", "-v", f"{tmp_path / 'small'}:/mnt/small:16",
        "-v", f"{tmp_path / 'other'}:/mnt/other:16", "--wait")
    try:
        fill = cli("exec", "full", "--user", "mvm", "--", "sh", "-c",
                   "dd if=/dev/zero of=/mnt/small/fill bs=1M count=64 2>&1; echo rc=$?", check=False)
        assert "No space left on device" in fill.stdout and "rc=1" in fill.stdout
        ok = cli("exec", "full", "--user", "mvm", "--", "python3", "-c", WRITE_BLOB, "/mnt/other/ok", "4096")
        assert len(ok.stdout.strip()) == 64
        assert cli("exec", "full", "--", "python3", "-c", READ_BLOB, "/mnt/other/ok").stdout == ok.stdout
        assert http_get(port) == "testbed\n"
        st = cli.json("status", "full")
        assert service(st, "web")["state"] == "running" and check(st, "web")["state"] == "healthy"
        leaks = _leaks(cli, {"full"})
    finally:
        cli("down", "full")
    leaks = {k: v + _leaks(cli)[k] for k, v in leaks.items()}
    recorder.add("full data volume", "the writer gets ENOSPC; the VM, its service, health and the other "
                 "volume keep working", 1, leaks, bytes_lost=0, started=started)
    _assert_clean(leaks)


def test_down_of_a_machine_that_cannot_be_stopped_fails_and_keeps_the_vm(
        cli: CLI, testbed_image: dict[str, Any], recorder: Recorder, tmp_path: Path) -> None:
    """A real QEMU that survives every rung of `down`: frozen in a (v1) freezer cgroup, it
    cannot answer the agent or QMP and does not act on SIGKILL until thawed. (cgroup v2's
    freezer lets SIGKILL through, so the test mounts a v1 freezer hierarchy of its own: that
    works on a v1, hybrid or v2 host alike, v2 having no freezer controller to hold it.)"""
    started = time.monotonic()
    hierarchy = tmp_path / "freezer"
    hierarchy.mkdir()
    mounted = subprocess.run(["mount", "-t", "cgroup", "-o", "freezer", "mvm-test-freezer", str(hierarchy)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a v1 freezer hierarchy (needs root): {mounted.stderr}"
    try:
        _stop_a_frozen_machine(cli, hierarchy / f"mvm-test-{os.getpid()}")
    finally:
        subprocess.run(["umount", str(hierarchy)], check=False)
    leaks = _leaks(cli)
    recorder.add("a machine that survives `down`", "QEMU frozen (cgroup freezer): down exits 1 naming the pid, "
                 "the VM stays listed as stopping, a later down finishes", 1, leaks, started=started)
    _assert_clean(leaks)


def _stop_a_frozen_machine(cli: CLI, freezer: Path) -> None:
    cli("up", TESTBED, "--name", "frozen")
    pid = _row(cli, "frozen")["pid"]
    freezer.mkdir()
    try:
        (freezer / "cgroup.procs").write_text(str(pid))
        (freezer / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN", 10, "QEMU to freeze")
        r = cli("down", "frozen", "--timeout", "2", check=False)
        assert r.returncode == 1, r.stderr
        assert f"QEMU (pid {pid})" in r.stderr and "still running" in r.stderr
        row = _row(cli, "frozen")
        assert row["status"] == "stopping" and (cli.vms / "frozen" / "vm.json").exists()
    finally:
        (freezer / "freezer.state").write_text("THAWED")
        for _ in range(100):  # the pending SIGKILL ends QEMU once thawed
            try:
                freezer.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert "down" in cli("down", "frozen").stderr
    assert "frozen" not in {r["name"] for r in cli.json("ls")}


def test_a_template_maker_ended_by_sigterm_stops_its_machine(cli: CLI, testbed_image: dict[str, Any],
                                                             recorder: Recorder) -> None:
    """The maker `up` leaves in the background, ended by SIGTERM: it died at once, and its
    hidden machine (hundreds of MiB) ran on until a `cleanup` (hands-on)."""
    started = time.monotonic()
    templates = Path(cli.env["MVM_CACHE"]) / "templates"
    maker = subprocess.Popen([sys.executable, "-m", "mvm._api.template_maker", "qemu", testbed_image["path"], "1",
                              "320"], env=cli.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: qemu_pids_under(templates), 60, "the template's machine to start")
        maker.send_signal(signal.SIGTERM)
        _, err = maker.communicate(timeout=60)
        assert maker.returncode == 130 and "interrupted; its machine stopped" in err, (maker.returncode, err)
        assert not qemu_pids_under(templates)
        assert not list(templates.glob(".build-*"))
    finally:
        maker.kill()
    leaks = _leaks(cli)
    recorder.add("SIGTERM to a template maker", "its machine stopped, its staging dir removed", 1, leaks,
                 bytes_lost=0, started=started)
    _assert_clean(leaks)
