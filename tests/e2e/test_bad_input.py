"""Issue 2's bad-input list: each gets a one-line error with a hint, exit 1, nothing left."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLI, EXAMPLES, free_port


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _spec(tmp_path: Path, text: str) -> Path:
    (tmp_path / "mvm.toml").write_text(text)
    return tmp_path


def test_unknown_spec_key(cli: CLI, tmp_path: Path, no_leaks: None) -> None:
    d = _spec(tmp_path, 'name = "x"\npackages = []\n[services.web]\ncommand = "true"\nrestrat = "no"\n')
    r = cli("build", str(d), check=False)
    assert r.returncode == 1
    assert "services.web.restrat: unknown key (did you mean 'restart'?)" in _error_line(r.stderr)
    assert "hint:" in r.stderr


def test_service_without_command(cli: CLI, tmp_path: Path, no_leaks: None) -> None:
    d = _spec(tmp_path, 'name = "x"\n[services.web]\npreStart = "true"\n')
    r = cli("up", str(d), check=False)
    assert r.returncode == 1
    assert "services.web.command: required key is missing" in _error_line(r.stderr)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-p", "web"], "-p 'web': guest port 'web' is not a number"),
        (["-p", "80:http"], "guest port 'http' is not a number"),
        (["-e", "NOEQUALS"], "-e 'NOEQUALS': expected KEY=VALUE"),
        (["-e", "9X=1"], "'9X' is not a valid variable name"),
        (["--name", "Bad_Name"], "not a valid VM name"),
        (["--hypervisor", "vmware"], "unknown hypervisor 'vmware'"),
    ],
)
def test_malformed_arguments(cli: CLI, hello_image: dict[str, Any], args: list[str], fragment: str,
                             no_leaks: None) -> None:
    r = cli("up", str(EXAMPLES / "hello"), *args, check=False)
    assert r.returncode == 1, r.stderr
    assert fragment in _error_line(r.stderr)


def test_host_port_in_use(cli: CLI, hello_image: dict[str, Any], no_leaks: None) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("up", str(EXAMPLES / "hello"), "--name", "porttest", "-p", f"{port}:8080", check=False)
    assert r.returncode == 1
    assert f"host port 127.0.0.1:{port}/tcp is not available" in _error_line(r.stderr)
    assert "hint: pick another host port" in r.stderr
    assert not (cli.vms / "porttest").exists()


def test_unknown_debian_package(cli: CLI, tmp_path: Path, hello_image: dict[str, Any], no_leaks: None) -> None:
    d = _spec(tmp_path, 'name = "x"\npackages = ["mvm-no-such-package"]\n')
    r = cli("build", str(d), check=False)
    assert r.returncode == 1
    line = _error_line(r.stderr)
    assert "Unable to locate package mvm-no-such-package" in line
    cache = Path(hello_image["path"]).parent.parent
    assert not list(cache.glob("images/.build-*")), "a half-built image was left in the store"
    assert not list(cache.glob("layers/.build-*")), "a half-built package layer was left"


def test_name_clash_with_running_vm(cli: CLI, hello_image: dict[str, Any], no_leaks: None) -> None:
    cli("up", str(EXAMPLES / "hello"), "--name", "clash")
    try:
        first = next(row for row in cli.json("ls") if row["name"] == "clash")
        r = cli("up", str(EXAMPLES / "hello"), "--name", "clash", "-p", f"{free_port()}:8080", check=False)
        assert r.returncode == 1
        assert "a VM named 'clash' already exists (running)" in _error_line(r.stderr)
        assert "mvmctl down clash" in r.stderr
        after = next(row for row in cli.json("ls") if row["name"] == "clash")
        assert (after["status"], after["pid"], after["ports"]) == ("running", first["pid"], first["ports"])  # untouched
    finally:
        cli("down", "clash")


def test_qemu_not_installed(cli: CLI, hello_image: dict[str, Any], tmp_path: Path, no_leaks: None) -> None:
    r = cli("up", str(EXAMPLES / "hello"), "--name", "noqemu", check=False, env={"PATH": str(tmp_path)})
    assert r.returncode == 1
    assert "`qemu-system-x86_64` is not installed" in _error_line(r.stderr)
    assert "apt-get install qemu-system-x86" in r.stderr
    assert not (cli.vms / "noqemu").exists()


def test_mmdebstrap_not_installed(cli: CLI, hello_image: dict[str, Any], tmp_path: Path,
                                  no_leaks: None) -> None:
    d = _spec(tmp_path, 'name = "needs-build"\npackages = ["jq"]\n')
    r = cli("build", str(d), check=False, env={"PATH": str(tmp_path)})
    assert r.returncode == 1
    assert "`mmdebstrap` is not installed" in _error_line(r.stderr)
    assert "apt-get install mmdebstrap" in r.stderr
