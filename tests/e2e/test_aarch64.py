"""aarch64 guests on this (x86_64) host, emulated by TCG: examples/hello built for arm64
(mmdebstrap under qemu-user), booted on ``qemu-system-aarch64 -M virt``, serving through
``-p``, healthy, running ``exec``, keeping a persistent volume across down/up, restored from
its template, and leaving nothing behind.

The arm64 image is built once per session (the package layer and the image are cached in
MVM_TEST_CACHE, so later sessions only boot). Building it needs qemu-user's binfmt handler:
the fixture registers it itself when it is missing (root), as scripts/setup.sh does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLI, EXAMPLES, free_port, http_get, qemu_pids_under

HELLO = str(EXAMPLES / "hello")
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


def _binfmt_enabled() -> bool:
    try:
        return BINFMT.read_text().splitlines()[0] == "enabled"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def arm_image(cli: CLI) -> dict[str, Any]:
    if os.uname().machine != "x86_64":
        pytest.skip("these tests emulate aarch64 on an x86_64 host")
    missing = [t for t in ("qemu-system-aarch64", "update-binfmts", "arch-test") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"aarch64 guests need {', '.join(missing)} (scripts/setup.sh installs them)")
    if "arm64" not in subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                                     text=True).stdout.split():
        pytest.skip("apt does not fetch arm64 packages: dpkg --add-architecture arm64 (scripts/setup.sh does it)")
    if not _binfmt_enabled():  # set the host state this test needs (idempotent; setup.sh does the same)
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False, capture_output=True)
        if not _binfmt_enabled():
            pytest.skip("could not register qemu-aarch64 with binfmt_misc (needs root)")
    result: dict[str, Any] = cli.json("build", HELLO, "--arch", "aarch64")
    return result


@pytest.fixture()
def arm_vm(cli: CLI, arm_image: dict[str, Any], no_leaks: None) -> Iterator[tuple[str, int]]:
    """examples/hello for aarch64, up with a forwarded port and healthy; down afterwards."""
    port = free_port()
    up = cli("up", HELLO, "--arch", "aarch64", "--name", "arm", "-p", f"{port}:8080", "--wait", "--timeout", "120")
    assert "arm is running (booted; tcg, aarch64, 1 vCPU, 512 MiB) and healthy" in up.stderr, up.stderr
    assert "note: aarch64 guest on an x86_64 host: emulated by QEMU (TCG)" in up.stderr, up.stderr
    try:
        yield "arm", port
    finally:
        cli("down", "arm")


def test_the_arm64_image(arm_image: dict[str, Any]) -> None:
    assert arm_image["arch"] == "aarch64" and arm_image["kernel"] == "Image"
    manifest = json.loads((Path(arm_image["path"]) / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64"
    kernel = (Path(arm_image["path"]) / "Image").read_bytes()[:0x40]
    assert kernel[0x38:0x3C] == b"ARMd"  # the arm64 Image, booted as it is


def test_hello_on_aarch64_serves_runs_exec_and_is_healthy(cli: CLI, arm_vm: tuple[str, int]) -> None:
    name, port = arm_vm
    assert http_get(port) == "<h1>Hello from mvm!</h1>\n"
    assert cli("exec", name, "--", "uname", "-m").stdout == "aarch64\n"
    row = next(r for r in cli.json("ls") if r["name"] == name)
    assert row["arch"] == "aarch64" and row["accel"] == "tcg" and row["health"] == "healthy"
    assert row["emulated"].startswith("aarch64 guest on an x86_64 host")
    assert any(ln.split()[:1] == [name] and "aarch64" in ln.split() for ln in cli("ls").stdout.splitlines())
    status = cli.json("status", name)
    assert status["guest"]["checks"][0]["state"] == "healthy"
    assert "[service hello] running" in cli("logs", name).stdout


def test_images_of_both_architectures_side_by_side(cli: CLI, arm_image: dict[str, Any],
                                                   hello_image: dict[str, Any]) -> None:
    assert hello_image["arch"] == "x86_64" and hello_image["key"] != arm_image["key"]
    images = {i["key"]: i for i in cli.json("images")}
    assert images[hello_image["key"]]["arch"] == "x86_64" and images[arm_image["key"]]["arch"] == "aarch64"
    again = cli.json("build", HELLO, "--arch", "aarch64")  # a cache hit, like x86's
    assert again["built"] is False and again["key"] == arm_image["key"]


def test_a_persistent_volume_keeps_its_data_on_aarch64(cli: CLI, arm_image: dict[str, Any], tmp_path: Path,
                                                        no_leaks: None) -> None:
    (tmp_path / "seed.txt").write_text("from the host\n")
    volume = f"{tmp_path}:/data:64"
    cli("up", HELLO, "--arch", "aarch64", "--name", "armvol", "-v", volume)
    try:
        assert cli("exec", "armvol", "--", "cat", "/data/seed.txt").stdout == "from the host\n"
        cli("exec", "armvol", "--", "sh", "-c", "echo kept > /data/written && sync")
    finally:
        cli("down", "armvol")
    cli("up", HELLO, "--arch", "aarch64", "--name", "armvol", "-v", volume)
    try:
        assert cli("exec", "armvol", "--", "cat", "/data/written").stdout == "kept\n"
    finally:
        cli("down", "armvol")
    assert not (cli.vms / "armvol").exists() and not qemu_pids_under(cli.vms)


def test_aarch64_restores_from_its_template(cli: CLI, arm_image: dict[str, Any], tmp_path: Path,
                                            no_leaks: None) -> None:
    """Fast start on the virt machine: the ready state, and the agent state with a hot-plugged volume."""
    restore = {"MVM_TEMPLATES": "restore"}
    made = json.loads(cli("template", "create", HELLO, "--arch", "aarch64", "--json", env=restore).stdout)
    try:
        assert made["arch"] == "aarch64" and set(made["kinds"]) == {"agent", "ready"}
        port = free_port()
        cli("up", HELLO, "--arch", "aarch64", "--name", "armfast", "-p", f"{port}:8080", env=restore)
        try:
            row = next(r for r in cli.json("ls") if r["name"] == "armfast")
            assert row["start"] == "restored", row["start_reason"]
            assert http_get(port) == "<h1>Hello from mvm!</h1>\n"
            assert cli("exec", "armfast", "--", "uname", "-m").stdout == "aarch64\n"
        finally:
            cli("down", "armfast")
        cli("up", HELLO, "--arch", "aarch64", "--name", "armfast", "-e", "K=V", "-v", f"{tmp_path}:/data:32",
            env=restore)
        try:
            row = next(r for r in cli.json("ls") if r["name"] == "armfast")
            assert row["start"] == "restored" and "(agent)" in row["start_reason"], row["start_reason"]
            cli("exec", "armfast", "--", "sh", "-c", "echo hot-plugged > /data/f && sync")
            assert cli("exec", "armfast", "--", "cat", "/data/f").stdout == "hot-plugged\n"
        finally:
            cli("down", "armfast")
    finally:
        cli("template", "rm", made["key"])
