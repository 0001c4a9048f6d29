"""Issue 11: a hostile guest and a long life, on real VMs. Each scenario adds a row to the
fault suite's report (docs/reliability.md) with its leak figures.

- a guest root that takes over the agent's ports floods the control and event channels;
- a guest crafts its volume (names with '/' and '..', a FIFO, a device node, a setuid file,
  hard links, an outside symlink, a sparse file larger than the volume; then a symlink
  swapped for a directory) and the host exports it;
- a service exhausts the guest's memory;
- the host's disk is full during build, up, volume creation and volume export.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ..hostile import GUEST_RENAME
from .conftest import CLI, FIXTURES, ROOT, check, service, wait_for
from .faults import Recorder, find_leaks

TESTBED = str(FIXTURES / "testbed")
OOM = str(FIXTURES / "oom")
FLOOD = Path(__file__).with_name("flood.py")
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")


def _leaks(cli: CLI, expected: set[str] = frozenset(), home: Path | None = None,  # type: ignore[assignment]
           cache: Path | None = None) -> dict[str, int]:
    return find_leaks(home or cli.home, cache or Path(cli.env["MVM_CACHE"]), set(expected))


def _assert_clean(leaks: dict[str, int]) -> None:
    assert not any(leaks.values()), f"leaks: {leaks}"


def _timed(cli: CLI, *args: str, timeout: float = 60) -> tuple[int, str, float]:
    """Run mvmctl; (exit code, stderr, peak RSS of that process in MB)."""
    proc = subprocess.Popen([sys.executable, "-m", "mvm", *args], env=cli.env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
        proc.stderr.close()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode != -signal.SIGKILL, f"mvmctl {' '.join(args)} did not end within {timeout}s"
    return proc.returncode, err, usage.ru_maxrss / 1024


# --- a hostile agent ----------------------------------------------------------------------


def test_a_hostile_agent_floods_the_control_and_event_channels(cli: CLI, testbed_image: dict[str, Any],
                                                               recorder: Recorder) -> None:
    """Control and event channels carry JSON nested 200,000 deep, lines of 3 MiB, floods of
    messages for other requests, wrong types and terminal escapes: every mvmctl command ends
    in time with a result or a one-line error (never a traceback), in bounded memory, and
    Ctrl-C stops `logs -f` at once. The VM's logs stay within its cap (``--log-limit 8``) on
    the host, the oldest output dropped with a note."""
    started = time.monotonic()
    cap = 8 << 20
    cli("up", TESTBED, "--name", "flood", "--wait", "--timeout", "120", "--log-limit", "8")
    faults = 0
    try:
        cli("cp", str(FLOOD), "flood:/tmp/flood.py")
        cli("exec", "flood", "--", "sh", "-c",
            "setsid python3 /tmp/flood.py 45 40 >/tmp/flood.log 2>&1 </dev/null &")
        time.sleep(2)
        deadline = time.monotonic() + 35
        seen: dict[str, set[int]] = {}
        worst_rss = 0.0
        while time.monotonic() < deadline:
            for args in (["status", "flood"], ["exec", "flood", "--", "true"], ["ls"], ["logs", "flood"],
                         ["stats", "flood", "--interval", "0.2"]):
                code, err, rss = _timed(cli, *args, timeout=60)
                faults += 1
                assert "Traceback" not in err and "This is a bug" not in err, err
                assert code in (0, 1), (args, code, err)
                if code == 1:
                    assert err.startswith("error: "), err
                seen.setdefault(args[0], set()).add(code)
                worst_rss = max(worst_rss, rss)
            follow = subprocess.Popen([sys.executable, "-m", "mvm", "logs", "flood", "-f"], env=cli.env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(2)
            sent = time.monotonic()
            follow.send_signal(signal.SIGINT)
            out, err_b = follow.communicate(timeout=30)
            assert follow.returncode == 130, err_b
            assert time.monotonic() - sent < 5, "Ctrl-C did not stop `logs -f` at once"
            assert b"\x1b" not in out and b"\x07" not in out
            faults += 1
        # the host-side commands never depend on the agent: they succeed throughout; the ones
        # that ask a hostile agent may fail, but only with a one-line error (checked above)
        assert seen.keys() == {"status", "exec", "ls", "logs", "stats"}, seen
        assert seen["ls"] == seen["logs"] == {0}, seen
        assert worst_rss < 200, f"a command grew to {worst_rss:.0f} MB"
        on_disk = {p.name: p.stat().st_size for p in (cli.vms / "flood").glob("*.log*")}
        assert "events.log.1" in on_disk, f"the flood never reached the cap: {on_disk}"
        assert sum(on_disk.values()) <= cap + (128 << 10), f"the logs outgrew their cap: {on_disk}"
        # the flood ends by itself (45 s); then the VM works as before
        wait_for(lambda: "wrote" in cli("exec", "flood", "--", "cat", "/tmp/flood.log", check=False).stdout,
                 60, "the flood to end")
        text = cli("logs", "flood").stdout
        assert "an event line longer than 256 KiB was left out" in text and "\x1b" not in text
        assert "bytes of older events output dropped (log cap" in text
        on_disk = {p.name: p.stat().st_size for p in (cli.vms / "flood").glob("*.log*")}
        assert sum(on_disk.values()) <= cap + (128 << 10), f"the logs outgrew their cap: {on_disk}"
        status = cli.json("status", "flood")
        assert check(status, "web")["state"] == "healthy"
        assert cli("exec", "flood", "--", "echo", "ok").stdout == "ok\n"
    finally:
        cli("down", "flood")
    leaks = _leaks(cli)
    recorder.add("a hostile agent floods its channels", "a guest root writes deep JSON, 3 MiB lines, "
                 "foreign-id floods, wrong types and escapes into every port: status, exec, ls, logs, stats end "
                 f"in time (0 or a one-line error, peak {worst_rss:.0f} MB), Ctrl-C ends logs -f in < 5 s, no "
                 "escape reaches the terminal, the logs on disk stay within the VM's 8 MiB cap", faults, leaks,
                 started=started)
    _assert_clean(leaks)


# --- a volume the guest crafted -------------------------------------------------------------

GUEST_CRAFT = """
set -e
cd /mnt/data
mkdir -p sub real
echo escaped > sub/AAAAAApwn_mv
echo ok > ok.txt
mkfifo pipe
mknod null c 1 3
cp /bin/true tool && chmod 4755 tool
echo shared > data && ln data hard
ln -s /etc/shadow abs-link
echo v1 > real/f
ln -s real a
truncate -s 1T huge
sync
"""

#: Switch metadata_csum off (a guest root can), so the raw rename below is a valid file system.
GUEST_CSUM_OFF = """
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(1024 + 0x64)
    ro, = struct.unpack("<I", f.read(4))
    f.seek(1024 + 0x64)
    f.write(struct.pack("<I", ro & ~0x400))
"""


#: The guest has no umount(8): libc's, as PID 1 does it.
GUEST_UMOUNT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
if libc.umount2(b"/mnt/data", 0) != 0:
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
"""


def _unmount_and(cli: CLI, vm: str, *scripts: tuple[str, ...]) -> None:
    dev = next(line.split()[0] for line in cli("exec", vm, "--", "cat", "/proc/mounts").stdout.splitlines()
               if line.split()[1] == "/mnt/data")
    cli("exec", vm, "--", "python3", "-c", GUEST_UMOUNT)
    for script in scripts:
        cli("exec", vm, "--", "python3", "-c", script[0], dev, *script[1:])


def test_volume_export_of_a_volume_the_guest_crafted(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder,
                                                     tmp_path: Path) -> None:
    """The reproduction: an entry renamed on the raw volume to ../../pwn_mv (metadata_csum
    off) made `volume export` (debugfs rdump) write two levels above the destination."""
    started = time.monotonic()
    data = tmp_path / "data"
    vol = f"{data}:/mnt/data:64"
    out = tmp_path / "a" / "b" / "out"
    out.parent.mkdir(parents=True)
    cli("up", TESTBED, "--name", "crafty", "-v", vol)
    try:
        cli("exec", "crafty", "--", "sh", "-c", GUEST_CRAFT)
        _unmount_and(cli, "crafty", (GUEST_CSUM_OFF,), (GUEST_RENAME, "AAAAAApwn_mv", "../../pwn_mv"))
    finally:
        cli("down", "crafty")
    result = cli.json("volume", "export", str(data), "--to", str(out))
    skipped = {line.split(": ")[0]: line for line in result["skipped"]}
    assert set(skipped) == {"sub/../../pwn_mv", "pipe", "null", "abs-link", "huge"}, result["skipped"]
    assert not list(tmp_path.rglob("pwn_mv")), "the crafted name was followed"
    assert (out / "ok.txt").read_text() == "ok\n" and (out / "hard").read_text() == "shared\n"
    assert os.stat(out / "hard").st_ino != os.stat(out / "data").st_ino  # a copy, never a link
    assert stat.S_IMODE(os.stat(out / "tool").st_mode) == 0o755  # no setuid from a guest
    assert os.readlink(out / "a") == "real"
    faults = 5

    # the guest swaps the symlink `a` for a directory, while the host's `a` now points outside
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "a").unlink()
    (out / "a").symlink_to(outside)
    cli("up", TESTBED, "--name", "crafty", "-v", vol)
    try:
        cli("exec", "crafty", "--", "sh", "-c", "cd /mnt/data && rm a && mkdir a && echo pwn > a/pwn && sync")
    finally:
        cli("down", "crafty")
    for force in ([], ["--force"]):
        r = cli("volume", "export", str(data), "--to", str(out), *force, check=False)
        assert r.returncode == 1 and "nothing was written" in r.stderr, r.stderr
        assert "a: a link on the host, a dir in the volume" in r.stderr
        faults += 1
    assert list(outside.iterdir()) == []
    leaks = _leaks(cli)
    recorder.add("a volume the guest crafted, exported", "names '../../pwn_mv' (raw edit, csum off), a FIFO, a "
                 "device node, a setuid file, hard links, an /etc/shadow symlink, a 1 TiB sparse file; then a "
                 "symlink swapped for a directory: nothing written outside, each skip listed, no setuid", faults,
                 leaks, started=started)
    _assert_clean(leaks)


# --- out of memory ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oom_image(cli: CLI) -> dict[str, Any]:
    return cli.json("build", OOM)


def test_a_service_that_exhausts_memory(cli: CLI, oom_image: dict[str, Any], recorder: Recorder) -> None:
    """The hog is OOM-killed and restarted with the reason in status; PID 1, the agent and
    health checks carry on, and exec (a fork) works right after."""
    started = time.monotonic()
    cli("up", OOM, "--name", "hog", "--wait", "--timeout", "120")
    try:
        cli("exec", "hog", "--", "touch", "/tmp/go")
        fired = time.monotonic()
        st = wait_for(lambda: (s := cli.json("status", "hog")) and service(s, "hog")["restarts"] >= 1
                      and service(s, "hog")["state"] == "running" and s, 120, "the hog to be killed and restarted")
        restarted_after = time.monotonic() - fired
        hog = service(st, "hog")
        assert hog["last_exit"] == -9
        assert hog["reason"].startswith("out of memory: the kernel's OOM killer killed python3"), hog
        t = time.monotonic()
        assert cli("exec", "hog", "--", "echo", "alive").stdout == "alive\n"
        exec_secs = time.monotonic() - t
        assert check(cli.json("status", "hog"), "web")["state"] == "healthy"
        assert "out of memory" in cli("status", "hog").stdout
        assert "out of memory" in cli("logs", "hog", "--service", "hog").stdout
        assert service(cli.json("status", "hog"), "web")["restarts"] == 0  # only the hog was killed
    finally:
        cli("down", "hog")
    leaks = _leaks(cli)
    recorder.add("a service exhausts the guest's memory", f"OOM-killed and restarted after {restarted_after:.0f}s "
                 f"with the reason in status; exec right after took {exec_secs:.1f}s; the other service and "
                 "health untouched", 1, leaks, started=started)
    _assert_clean(leaks)


# --- a full host disk -----------------------------------------------------------------------------


@contextmanager
def _tmpfs(path: Path, size_mb: int, free_mb: float | None = None) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``path``; with ``free_mb``, filled up to leave that much."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M,mode=0700", "tmpfs", str(path)], check=True)
    try:
        if free_mb is not None:
            st = os.statvfs(path)
            with open(path / ".filler", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - int(free_mb * 2**20))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".filler")


@NEEDS_ROOT
def test_a_full_disk_during_build_up_and_volumes(cli: CLI, testbed_image: dict[str, Any], recorder: Recorder,
                                                 tmp_path: Path) -> None:
    started = time.monotonic()
    faults = 0
    leaks = dict.fromkeys(_leaks(cli), 0)

    def add(found: dict[str, int], tmpfs: bool = True) -> None:
        found["mounts"] -= tmpfs  # the test's own tmpfs, where MVM_HOME or MVM_CACHE is
        for key, value in found.items():
            leaks[key] += value

    # build: the cache's disk fills while mmdebstrap installs packages
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "mvm.toml").write_text(f'name = "full"\npackages = ["python3", "curl"]\nhostname = "f{time.time_ns()}"\n')
    with _tmpfs(tmp_path / "cache", 250) as cache:
        r = cli("build", str(spec), check=False, env={"MVM_CACHE": str(cache)})
        assert r.returncode == 1 and "a disk is full (No space left on device)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "hint: free some space" in r.stderr
        assert not [f for f in _files_under(cache) if ".build-" in f], "a half-built image or layer was left"
        assert not (cache / "images").exists() or not any((cache / "images").iterdir())
        add(_leaks(cli, cache=cache))
        faults += 1

    # up: the state dir's disk has 100 MB free (a VM needs 128 MB)
    with _tmpfs(tmp_path / "home", 300, free_mb=100) as home:
        r = cli("up", TESTBED, "--name", "full", check=False, env={"MVM_HOME": str(home)})
        assert r.returncode == 1 and "has 100 MiB free; a VM" in r.stderr and "nothing was written" in r.stderr
        assert _files_under(home) in ([], ["state"], ["state", "state/vms"]), _files_under(home)
        add(_leaks(cli, home=home))
        faults += 1

    # volume creation: 140 MB free, a 120 MB seed (mkfs would write it all)
    seed = tmp_path / "seed"
    seed.mkdir()
    with open(seed / "blob", "wb") as f:
        f.write(os.urandom(120 << 20))
    with _tmpfs(tmp_path / "home2", 300, free_mb=140) as home:
        r = cli("up", TESTBED, "--name", "full", "-v", f"{seed}:/mnt/data:256", check=False,
                env={"MVM_HOME": str(home)})
        assert r.returncode == 1 and "creating the 256 MiB volume" in r.stderr and "needs 152 MiB" in r.stderr, r.stderr
        left = _files_under(home)
        # the VM's lock file stays (until `cleanup`; _leaks counts it if still held)
        assert not [f for f in left if (f.startswith("state/vms/") and not f.startswith("state/vms/.locks"))
                    or ".new-" in f or f.endswith("disk.ext4")], left
        add(_leaks(cli, home=home))
        faults += 1

    # volume export into a disk with less room than the volume's files
    data = tmp_path / "data"
    cli("up", TESTBED, "--name", "full", "-v", f"{data}:/mnt/data:128")
    try:
        cli("exec", "full", "--", "sh", "-c", "head -c 48M /dev/urandom > /mnt/data/big && sync")
    finally:
        cli("down", "full")
    with _tmpfs(tmp_path / "small", 64) as small:
        r = cli("volume", "export", str(data), "--to", str(small / "out"), check=False)
        assert r.returncode == 1 and "nothing was written" in r.stderr and "MiB free" in r.stderr, r.stderr
        assert _files_under(small) == []
        faults += 1
    add(_leaks(cli), tmpfs=False)
    recorder.add("a full host disk", "build (cache on a 250 MB tmpfs), up (100 MB free), volume creation (a 120 MB "
                 "seed, 140 MB free), volume export (48 MB into 64 MB): exit 1 naming the disk, nothing "
                 "half-written", faults, leaks, started=started)
    _assert_clean(leaks)


@NEEDS_ROOT
def test_a_host_disk_that_fills_under_a_volume_pauses_the_vm_status_says_so_and_resume_goes_on(
        cli: CLI, testbed_image: dict[str, Any], tmp_path: Path) -> None:
    """QEMU pauses a machine whose disk write failed for lack of host space (and loses
    nothing). `status` said only that the agent did not answer, and only `down` got out."""
    with _tmpfs(tmp_path / "small", 96) as small:
        image = small / "vol.ext4"
        subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
        st = os.statvfs(small)
        with open(small / ".filler", "wb") as f:  # 8 MiB left for the volume's 24 MiB write
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 8 * 2**20)
        cli("up", TESTBED, "--name", "hostfull", "-v", f"{image}:/mnt/big:64", "--wait")
        writer = subprocess.Popen([sys.executable, "-m", "mvm", "exec", "hostfull", "--", "sh", "-c",
                                   "yes mvm | head -c 25165824 > /mnt/big/fill && sync; echo rc=$?; "
                                   "yes mvm | head -c 25165824 | cmp - /mnt/big/fill && echo same"],
                                  env=cli.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def paused() -> str | None:
                r = cli("status", "hostfull", check=False)
                return r.stderr if "is paused" in r.stderr else None

            said = wait_for(paused, 90, "status to say the VM is paused")
            assert "VM 'hostfull' is paused: a write to one of its disks failed, most likely because the host " \
                   "disk holding it is full" in said
            assert "free space where its disks are" in said and "`mvmctl resume hostfull` continues it" in said
            (small / ".filler").unlink()  # space again
            cli("resume", "hostfull")
            out, err = writer.communicate(timeout=120)
            assert out == "rc=0\nsame\n", (out, err)  # every byte written, none lost while paused
            assert service(cli.json("status", "hostfull"), "web")["state"] == "running"
        finally:
            writer.kill()
            cli("down", "hostfull", check=False)
