"""Fast start (real VMs): a template restored instead of a boot, clones that are their own
machines, every `up` feature after a restore, damaged templates, suspend and resume."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mvm.runtime.templates import env_digest
from mvm.testing import VMFactory

from .conftest import CLI, EXAMPLES, free_port, http_get, qemu_pids_under, wait_for
from .faults import find_leaks

HELLO = str(EXAMPLES / "hello")
RESTORE = {"MVM_TEMPLATES": "restore"}


@pytest.fixture(scope="module")
def template(cli: CLI, hello_image: dict[str, Any]) -> Iterator[dict[str, Any]]:
    info: dict[str, Any] = json.loads(cli("template", "create", HELLO, "--json").stdout)
    yield info


def _up(cli: CLI, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(cli("up", HELLO, *args, "--json", env=env or RESTORE).stdout)
    return row


def test_a_restored_hello_serves_and_says_so(no_leaks: None, cli: CLI, template: dict[str, Any],
                                            mvm_vm: VMFactory) -> None:
    assert template["kinds"] == ["agent", "ready"] and template["bytes_on_disk"] > 0
    vm = mvm_vm(HELLO, ports=[8080])  # the pytest plugin: restored from the template, down after the test
    info = vm.info()
    assert info.start == "restored" and "(ready)" in (info.start_reason or "")
    assert http_get(vm.host_port(8080)) == "<h1>Hello from mvm!</h1>\n"
    listed = next(r for r in cli.json("ls") if r["name"] == vm.name)
    assert listed["start"] == "restored" and listed["health"] == "healthy"
    asked = time.time()
    guest_time = float(vm.exec("date", "+%s.%N").stdout)
    answered = time.time()
    # the clone's clock is the host's, not the template's (bounded by when it was asked and
    # answered, so a slow exec on a loaded host does not fail it)
    assert asked - 0.5 < guest_time < answered + 0.5


def test_two_clones_of_one_template_are_different_machines(no_leaks: None, template: dict[str, Any],
                                                           mvm_vm: VMFactory) -> None:
    clones = [mvm_vm(HELLO, ports=[8080], name=name) for name in ("fa", "fb")]
    seen = []
    for vm in clones:
        assert vm.info().start == "restored"
        assert http_get(vm.host_port(8080)) == "<h1>Hello from mvm!</h1>\n"
        out = vm.exec("sh", "-c", "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1")
        seen.append(out.stdout.decode().split("\n", 2))
    assert [s[0] for s in seen] == [vm.name for vm in clones]
    assert seen[0][1] != seen[1][1], "clones share a machine-id"
    assert seen[0][2] != seen[1][2], "clones read the same bytes from /dev/urandom"


def test_env_and_a_volume_after_a_restore(cli: CLI, template: dict[str, Any], tmp_path: Path,
                                          no_leaks: None) -> None:
    data = tmp_path / "data"
    port = free_port()
    row = _up(cli, "--name", "fv", "-p", f"{port}:8080", "-e", "GREETING=from-env", "-v", f"{data}:/mnt/data:32")
    try:
        assert row["start"] == "restored" and "(agent)" in row["start_reason"]
        assert http_get(port) == "<h1>Hello from mvm!</h1>\n"
        assert cli("exec", "fv", "--", "printenv", "GREETING").stdout == "from-env\n"
        cli("exec", "fv", "--", "sh", "-c", "echo kept > /mnt/data/note && sync")
    finally:
        cli("down", "fv")
    row = _up(cli, "--name", "fv", "-v", f"{data}:/mnt/data:32")
    try:
        assert row["start"] == "restored"
        # no wait: `up` of a clone returns once its volumes are mounted (the soak bench once
        # wrote into the bare mount point of a clone whose volume was mounted a moment later)
        assert cli("exec", "fv", "--", "sh", "-c", "mountpoint -q /mnt/data && cat /mnt/data/note").stdout == "kept\n"
    finally:
        cli("down", "fv")


SERVICE_ENV = ("for p in /proc/[0-9]*; do grep -q http.server $p/cmdline 2>/dev/null && "
               "tr '\\0' '\\n' < $p/environ | grep '^GREETING=' && break; done")


def test_an_env_set_gets_a_ready_state_of_its_own(cli: CLI, template: dict[str, Any], no_leaks: None) -> None:
    """The first `up -e` restores `agent` and starts its services; a maker then saves a `ready`
    state for those values, which the next `up` with exactly them restores. (Values of this run
    only: the template cache outlives the run, and so do the states made in it.)"""
    value = f"again-{secrets.token_hex(4)}"
    row = _up(cli, "--name", "fe", "-p", "8080", "-e", f"GREETING={value}", env={"MVM_TEMPLATES": "auto"})
    cli("down", "fe")
    assert "(agent)" in row["start_reason"]
    state = Path(template["path"]) / f"ready-env-{env_digest({'GREETING': value})}.json"
    wait_for(state.exists, 120, f"the ready state for GREETING={value}")
    templates = Path(template["path"]).parent
    wait_for(lambda: not [p for p in templates.iterdir() if p.name.startswith((".env-", ".build-"))], 10,
             "the maker to remove its values file and staging dir")
    row = _up(cli, "--name", "fe", "-p", "8080", "-e", f"GREETING={value}")
    try:
        assert row["start"] == "restored" and "(ready, with these -e values)" in row["start_reason"]
        assert http_get(row["ports"][0]["host_port"]) == "<h1>Hello from mvm!</h1>\n"
        assert cli("exec", "fe", "--", "sh", "-c", SERVICE_ENV).stdout == f"GREETING={value}\n"
        assert cli("exec", "fe", "--", "hostname").stdout == "fe\n"
    finally:
        cli("down", "fe")
    other = f"other-{secrets.token_hex(4)}"  # values never seen: agent, services started anew
    row = _up(cli, "--name", "fe", "-e", f"GREETING={other}")
    try:
        assert "(agent)" in row["start_reason"]
        assert cli("exec", "fe", "--", "sh", "-c", SERVICE_ENV).stdout == f"GREETING={other}\n"
    finally:
        cli("down", "fe")


def test_a_spec_change_makes_a_new_template(cli: CLI, template: dict[str, Any], tmp_path: Path) -> None:
    spec = (EXAMPLES / "hello" / "mvm.toml").read_text().replace("Hello from mvm!", "Hello again!")
    (tmp_path / "mvm.toml").write_text(spec)
    other = json.loads(cli("template", "create", str(tmp_path), "--json").stdout)
    assert other["key"] != template["key"] and other["image"] != template["image"]
    keys = {t["key"] for t in cli.json("template", "ls")}
    assert {template["key"], other["key"]} <= keys
    cli("template", "rm", other["key"][:12])
    cli("rmi", other["image"][:12])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_template_boots_cold_warns_and_is_made_again(cli: CLI, hello_image: dict[str, Any],
                                                               damage: str, no_leaks: None) -> None:
    info = json.loads(cli("template", "create", HELLO, "--json").stdout)
    path = Path(info["path"])
    if damage == "truncate":
        os.truncate(path / "ready.state", (path / "ready.state").stat().st_size // 2)
    else:  # bytes flipped in the middle of the saved RAM
        with open(path / "ready.ram", "r+b") as ram:
            ram.seek((path / "ready.ram").stat().st_size // 2)
            ram.write(b"\xde\xad\xbe\xef")
    port = free_port()
    r = cli("up", HELLO, "--name", "fd", "-p", f"{port}:8080", env={"MVM_TEMPLATES": "auto"})
    try:
        assert "booted cold: the template was damaged" in r.stderr
        row = next(x for x in cli.json("ls") if x["name"] == "fd")
        assert row["start"] == "cold" and "damaged" in row["start_reason"]
        assert http_get(port) == "<h1>Hello from mvm!</h1>\n"
        # auto: a new template is made in the background after the cold boot
        remade = wait_for(lambda: [t for t in cli.json("template", "ls") if t["key"] == info["key"]
                                   and not t["damaged"]], 180, "the template to be made again")
        assert remade[0]["kinds"] == ["agent", "ready"]
    finally:
        cli("down", "fd")
    assert not [p for p in (path.parent).iterdir() if p.name.startswith(".build-")]
    assert not qemu_pids_under(Path(cli.env["MVM_CACHE"]))  # the background maker left no QEMU


def test_suspend_and_resume_keep_processes_and_tmp(cli: CLI, hello_image: dict[str, Any], no_leaks: None) -> None:
    port = free_port()
    cli("up", HELLO, "--name", "fz", "-p", f"{port}:8080")
    try:
        # the counter is renamed into place: `echo > file` truncates first, and a read between
        # the two saw an empty file (a CI run failed so)
        cli("exec", "fz", "--", "sh", "-c", "echo kept > /tmp/f; (i=0; while true; do i=$((i+1)); "
            "echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.2; done) >/dev/null 2>&1 &")
        before = int(wait_for(lambda: cli("exec", "fz", "--", "cat", "/tmp/counter", check=False).stdout.strip(),
                              10, "the counter to start"))
        added = free_port()
        cli("forward", "fz", "-p", f"{added}:8080")  # after its up: resumed with it all the same
        cli("suspend", "fz")
        row = next(x for x in cli.json("ls") if x["name"] == "fz")
        assert row["status"] == "suspended" and not qemu_pids_under(cli.home)
        assert "kept: suspended VM fz" in cli("cleanup", "--dry-run").stderr
        moved = free_port()  # a suspended VM's forward moved (its host port taken meanwhile, say)
        cli("forward", "fz", "--rm", "-p", f"{added}:8080")
        cli("forward", "fz", "-p", f"{moved}:8080")
        cli("resume", "fz")
        assert cli("exec", "fz", "--", "cat", "/tmp/f").stdout == "kept\n"
        after = int(cli("exec", "fz", "--", "cat", "/tmp/counter").stdout)
        assert after >= before  # the same process, counting on from where it was
        time.sleep(1.0)
        assert int(cli("exec", "fz", "--", "cat", "/tmp/counter").stdout) > after
        assert http_get(port) == "<h1>Hello from mvm!</h1>\n"
        assert http_get(moved) == "<h1>Hello from mvm!</h1>\n"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", added)) != 0  # removed while suspended: not opened again
        cli("suspend", "fz")
    finally:
        cli("down", "fz")
    assert not (cli.vms / "fz").exists()


def test_a_suspended_vm_keeps_its_volume(cli: CLI, hello_image: dict[str, Any], tmp_path: Path,
                                         no_leaks: None) -> None:
    """The suspended guest has the volume mounted, its writes partly in memory: a second VM on
    it meanwhile had its files overwritten when the first resumed (found by a walkthrough)."""
    volume = f"{tmp_path / 'data'}:/mnt/data:64"
    cli("up", HELLO, "--name", "fv", "-v", volume)
    try:
        cli("exec", "fv", "--", "sh", "-c", "echo first > /mnt/data/f")
        cli("suspend", "fv")
        r = cli("up", HELLO, "--name", "fw", "-v", volume, check=False)
        assert r.returncode == 1 and "belongs to suspended VM 'fv'" in r.stderr, r.stderr
        r = cli("volume", "rm", str(tmp_path / "data"), "--yes", check=False)
        assert r.returncode == 1 and "suspended VM 'fv'" in r.stderr, r.stderr
        cli("resume", "fv")
        assert cli("exec", "fv", "--", "cat", "/mnt/data/f").stdout == "first\n"
    finally:
        cli("down", "fv")
    cli("up", HELLO, "--name", "fw", "-v", volume)  # free once the VM is gone
    try:
        assert cli("exec", "fw", "--", "cat", "/mnt/data/f").stdout == "first\n"
    finally:
        cli("down", "fw")


def test_cleanup_shows_templates_with_their_size(cli: CLI, template: dict[str, Any]) -> None:
    notes = cli("cleanup", "--dry-run").stderr
    assert re.search(rf"kept: template {template['key'][:12]} .*MB", notes)


def test_a_killed_template_maker_leaves_no_machine(cli: CLI, hello_image: dict[str, Any]) -> None:
    """A template maker killed outright (SIGKILL, the OOM killer) left its QEMU running for
    good, holding its RAM and the files cleanup then "freed" (hands-on). `cleanup` stops it,
    and so does the next maker of that template, which then makes it."""
    templates = Path(cli.env["MVM_CACHE"]) / "templates"

    def gone(pid: int) -> bool:  # or a zombie: stopped, its reaper (init, for an orphan) not yet there
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    def killed_maker() -> int:
        maker = subprocess.Popen([sys.executable, "-m", "mvm", "template", "create", HELLO, "--memory", "544"],
                                 env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            (pid,) = wait_for(lambda: qemu_pids_under(templates), 120, "the template's QEMU")
        finally:
            maker.kill()
            maker.wait()
        time.sleep(0.5)
        assert not gone(pid), "the machine went with its maker: nothing to test"
        return pid

    pid = killed_maker()
    assert "interrupted template build" in cli("cleanup").stdout
    assert gone(pid) and not list(templates.glob(".build-*"))
    pid = killed_maker()
    made = json.loads(cli("template", "create", HELLO, "--memory", "544", "--json").stdout)
    assert gone(pid) and not list(templates.glob(".build-*"))
    cli("template", "rm", made["key"])
    assert find_leaks(cli.home, Path(cli.env["MVM_CACHE"]))["qemu_processes"] == 0


def test_a_save_that_fails_leaves_the_vm_running(no_leaks: None, mvm_vm: VMFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A suspend whose save does not finish (here: the first wait for it says "failed", while
    QEMU is still writing) must let the guest run on: it used to stay paused, listed as
    running, its agent silent."""
    from mvm.backends import qemu
    from mvm.errors import VMError

    vm = mvm_vm(HELLO, ports=[8080], name="fs")
    real, calls = qemu._migration_end, []

    def fails_first(qmp: Any, stall: float) -> str:
        calls.append(stall)
        return "failed" if len(calls) == 1 else real(qmp, stall)

    monkeypatch.setattr(qemu, "_migration_end", fails_first)
    with pytest.raises(VMError, match="saving the machine failed \\(failed\\)"):
        vm.suspend()
    assert len(calls) == 2  # and then waited for the cancel
    assert vm.info().status == "running"
    assert vm.exec("echo", "alive").stdout == b"alive\n"  # not paused
    assert http_get(vm.host_port(8080)) == "<h1>Hello from mvm!</h1>\n"
    assert not list(vm.layout.vm_dir(vm.name).glob("saved*"))  # no partial state


def test_a_suspended_clone_outlives_its_template(cli: CLI, hello_image: dict[str, Any], no_leaks: None) -> None:
    """`template rm` (or a new `-e` state pushing out an old one) must not take the files a
    suspended clone resumes from: the clone holds its own links to them. Last in the module:
    it makes and removes a template of its own (the shared one stays for the tests above)."""
    made = json.loads(cli("template", "create", HELLO, "--memory", "320", "--json").stdout)
    port = free_port()
    row = _up(cli, "--name", "fo", "--memory", "320", "-p", f"{port}:8080")
    try:
        assert row["start"] == "restored"
        cli("exec", "fo", "--", "sh", "-c", "echo kept > /tmp/f")
        cli("suspend", "fo")
        cli("template", "rm", made["key"][:12])
        assert not Path(made["path"]).exists()
        cli("resume", "fo")
        assert cli("exec", "fo", "--", "cat", "/tmp/f").stdout == "kept\n"
        assert http_get(port) == "<h1>Hello from mvm!</h1>\n"
    finally:
        cli("down", "fo")
