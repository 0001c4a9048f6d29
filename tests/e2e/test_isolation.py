"""QEMU without root: each VM's QEMU runs as a user of its own and can reach only what it
was handed (issue 11). Tried the way an escaped guest would: as one VM's QEMU user, against
the other VM's files, sockets and process."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.runtime import machine_users

from .conftest import CLI, EXAMPLES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="QEMU users of their own need mvm to run as root")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


@pytest.fixture(scope="module")
def two_vms(cli: CLI, hello_image: dict[str, object]) -> Iterator[dict[str, dict[str, object]]]:
    vms: dict[str, dict[str, object]] = {}
    try:
        for name in ("iso-a", "iso-b"):
            cli("up", str(EXAMPLES / "hello"), "--name", name)
            info = cli.json("status", name)
            vms[name] = {"pid": info["pid"], "dir": Path(info["dir"])}
        yield vms
    finally:
        for name in vms:
            cli("down", name, check=False)


def _as(uid: int, code: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as ``uid`` (its own group and the VMs' shared one, as QEMU has)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={machine_users.base()}",
                           sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)


def test_each_qemu_runs_as_its_own_unprivileged_user(two_vms: dict[str, dict[str, object]]) -> None:
    a, b = (_status(int(str(two_vms[n]["pid"]))) for n in ("iso-a", "iso-b"))
    uid_a, uid_b = int(a["Uid"].split()[0]), int(b["Uid"].split()[0])
    base = machine_users.base()
    assert uid_a != uid_b and all(base < u <= base + machine_users.SLOTS for u in (uid_a, uid_b))
    for st, uid in ((a, uid_a), (b, uid_b)):
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
        assert "0" not in st["Groups"].split()  # never root's group
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert st["NoNewPrivs"] == "1" or st["Seccomp"] == "2"  # QEMU's sandbox is on


def test_one_vms_qemu_user_cannot_reach_another_vm(two_vms: dict[str, dict[str, object]]) -> None:
    pid_a, pid_b = (int(str(two_vms[n]["pid"])) for n in ("iso-a", "iso-b"))
    uid_a = int(_status(pid_a)["Uid"].split()[0])
    dir_a, dir_b = (Path(str(two_vms[n]["dir"])) for n in ("iso-a", "iso-b"))
    attempts = {
        "B's root disk": f"open({str(dir_b / 'root.qcow2')!r}, 'rb')",
        "B's monitor socket": f"import socket; socket.socket(socket.AF_UNIX).connect({str(dir_b / 'qmp.sock')!r})",
        "B's agent socket": f"import socket; socket.socket(socket.AF_UNIX).connect({str(dir_b / 'c0.sock')!r})",
        "signal B's QEMU": f"import os; os.kill({pid_b}, 0)",
        "B's QEMU memory": f"open('/proc/{pid_b}/mem', 'rb').read(1)",
        "B's QEMU environment": f"open('/proc/{pid_b}/environ', 'rb').read()",
        # not even its own files by path: QEMU was handed descriptors
        "A's own root disk": f"open({str(dir_a / 'root.qcow2')!r}, 'rb')",
        "A's own record": f"open({str(dir_a / 'vm.json')!r})",
    }
    for what, code in attempts.items():
        proc = _as(uid_a, code)
        assert proc.returncode != 0, f"as A's QEMU user ({uid_a}), {what} was reachable"
        assert "PermissionError" in proc.stderr or "Operation not permitted" in proc.stderr, (what, proc.stderr)
    # and the same user does reach what is its own: A's QEMU process
    assert _as(uid_a, f"import os; os.kill({pid_a}, 0)").returncode == 0


def test_the_user_is_free_again_when_the_vm_ends(cli: CLI, hello_image: dict[str, object]) -> None:
    cli("up", str(EXAMPLES / "hello"), "--name", "iso-c")
    pid = cli.json("status", "iso-c")["pid"]
    uid = int(_status(pid)["Uid"].split()[0])
    cli("down", "iso-c")
    fd = os.open(machine_users.LOCKS / f"{uid}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anything still holds it
    finally:
        os.close(fd)
