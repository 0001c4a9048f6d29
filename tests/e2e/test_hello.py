"""Issue 2's acceptance path: build examples/hello, boot it, fetch the page, tear down."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .conftest import CLI, EXAMPLES, free_port, http_get, qemu_pids_under


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_hello_build_up_get_ls_logs_down(cli: CLI, hello_image: dict[str, Any], no_leaks: None) -> None:
    rootfs = Path(hello_image["path"]) / "rootfs.ext4"
    before = _digest(rootfs)
    port = free_port()
    up = cli("up", str(EXAMPLES / "hello"), "-p", f"{port}:8080")
    assert f"127.0.0.1:{port} -> guest 8080/tcp" in up.stdout

    assert http_get(port) == "<h1>Hello from mvm!</h1>\n"

    rows = cli.json("ls")
    row = next(r for r in rows if r["name"] == "hello")
    assert row["status"] == "running"
    assert row["ports"] == [{"host_ip": "127.0.0.1", "host_port": port, "guest_port": 8080, "proto": "tcp"}]
    assert row["accel"] in ("tcg", "kvm") and row["backend"] == "qemu"
    # KVM only where its probe proved it boots: doctor's verdict (the probe's cached one) and
    # the accelerator up chose agree
    doctor = json.loads(cli("doctor", "--json", check=False).stdout)
    kvm = next(b for b in doctor["backends"] if b["backend"] == "qemu-kvm")
    if kvm["usable"] is not True:
        assert row["accel"] == "tcg", (row["accel"], kvm)
    table = cli("ls").stdout
    assert "hello" in table and "running" in table and f"{port}->8080" in table

    logs = cli("logs", "hello").stdout
    assert "[service hello] running" in logs
    assert '"GET / HTTP/1.1" 200' in logs  # the service's own stderr, streamed from the guest
    assert "mvm-init: ready" in logs  # the boot console
    entries = [json.loads(line) for line in cli("logs", "hello", "--json", "--service", "hello").stdout.splitlines()]
    assert entries and all(e["service"] == "hello" and e["time"] > 0 for e in entries)
    assert any(e["source"] == "service" and '"GET / HTTP/1.1" 200' in e["text"] for e in entries)
    # The boot's first events wait for the host's first ping to set the guest's clock (the RTC
    # gives whole seconds): each event's time less its uptime is the same boot instant, not
    # one up to a second early for the events before the ping.
    events = [json.loads(line) for line in (cli.vms / "hello" / "events.log").read_text().splitlines()]
    boot = [e["t"] - e["up"] for e in events if "up" in e]
    assert len(boot) >= 3 and max(boot) - min(boot) < 0.05, events

    # the guest writes to its root filesystem; the cached image must not change
    cli("exec", "hello", "--", "sh", "-c", "echo scribble > /etc/scribble && sync")
    pid = row["pid"]
    down = cli("down", "hello")
    assert "hello: down" in down.stderr
    assert not (cli.vms / "hello").exists()
    assert not Path(f"/proc/{pid}").exists() or pid not in qemu_pids_under(cli.home)
    assert _digest(rootfs) == before
    again = cli("down", "hello")  # idempotent
    assert again.returncode == 0 and "not found (nothing to stop)" in again.stderr


def test_unchanged_spec_is_a_cache_hit(cli: CLI, hello_image: dict[str, Any]) -> None:
    result = cli.json("build", str(EXAMPLES / "hello"))  # how fast, bench/run.py measures (warm build)
    assert result["built"] is False
    assert result["key"] == hello_image["key"]
    assert set(result["sizes"]) == {"vmlinux", "initrd", "rootfs.ext4"}
    assert result["guest"]["services"]["hello"]["command"].startswith("python3 -m http.server")
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["arch"] == "x86_64"


def test_a_vm_records_its_own_spec_not_the_first_builders(cli: CLI, hello_image: dict[str, Any], tmp_path: Path,
                                                          no_leaks: None) -> None:
    """A copy of examples/hello is the same image (keys are by content): its VM used to record
    examples/hello's path, and `restart`'s hints sent the user there."""
    copy = tmp_path / "hello"
    copy.mkdir()
    for f in (EXAMPLES / "hello").iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    cli("up", str(copy), "--name", "hcopy")
    try:
        assert cli.json("status", "hcopy")["source"] == str(copy / "mvm.toml")
    finally:
        cli("down", "hcopy")
