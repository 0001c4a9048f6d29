"""Fixtures for end-to-end tests: real images, real QEMU VMs, driven through `mvmctl`.

One state dir (``MVM_HOME``) per test session; built images and the kernel go to a cache
that survives sessions locally (``MVM_TEST_CACHE``, default ~/.cache/mvm-tests) and is
empty on a fresh CI machine. Images are built once per session and shared.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mvm.paths import Layout

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"


class CLI:
    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.env = env
        self.home = home

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "mvm", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=ROOT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"mvmctl {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    @property
    def vms(self) -> Path:
        return self.home / "state" / "vms"


def service(status: dict[str, Any], name: str) -> dict[str, Any]:
    """One service from ``status --json`` (its guest.services list)."""
    return next(s for s in status["guest"]["services"] if s["name"] == name)


def check(status: dict[str, Any], name: str) -> dict[str, Any]:
    """One health check from ``status --json`` (its guest.checks list)."""
    return next(c for c in status["guest"]["checks"] if c["name"] == name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str = "/", timeout: float = 60.0) -> str:
    """GET through a forwarded port, retrying while the guest service starts."""
    import urllib.request

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return resp.read().decode()
        except Exception as exc:  # connection refused / reset while the service starts
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"GET :{port}{path} never succeeded: {last}")


def qemu_pids_under(home: Path) -> list[int]:
    """QEMU processes whose cwd is a VM dir under ``home`` (i.e. ours)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (comm.startswith("mvm-") or "qemu" in comm) and cwd.startswith(str(home)):
            pids.append(int(entry.name))
    return pids


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def mvm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("mvmhome")
    yield home
    leaked = qemu_pids_under(home)
    for pid in leaked:
        os.kill(pid, 9)
    assert not leaked, f"QEMU processes leaked by the test session: {leaked}"


@pytest.fixture(scope="session")
def cli(mvm_home: Path) -> CLI:
    cache = os.environ.get("MVM_TEST_CACHE", str(Path.home() / ".cache" / "mvm-tests"))
    # Templates (fast start) are off unless a test turns them on: the other tests boot cold, and
    # no background template maker competes with them for the two cores.
    env = {**os.environ, "MVM_HOME": str(mvm_home), "MVM_CACHE": cache, "NO_COLOR": "1",
           "COLUMNS": "200", "MVM_TEMPLATES": "off"}
    env.pop("MVM_DEBUG", None)
    return CLI(env, mvm_home)


@pytest.fixture(scope="session")
def mvm_layout(cli: CLI) -> Layout:
    """Where the pytest plugin's VMs (``mvm_vm``) live: with `cli`'s, so tests can use both."""
    return Layout(state=cli.home / "state", cache=Path(cli.env["MVM_CACHE"]))


@pytest.fixture(scope="session")
def hello_image(cli: CLI) -> dict[str, Any]:
    return cli.json("build", str(EXAMPLES / "hello"))


def _vm_entries(vms: Path) -> set[str]:
    """The VM dirs, any cut-short removal beside them, and the VMs' lock files (a VM that
    is gone takes its lock file with it)."""
    entries = (set(os.listdir(vms)) if vms.exists() else set()) - {".locks"}
    locks = vms / ".locks"
    return entries | ({f".locks/{name}" for name in os.listdir(locks)} if locks.exists() else set())


@pytest.fixture()
def no_leaks(cli: CLI) -> Iterator[None]:
    """The test must leave no VM dir, lock file or QEMU process of its own behind."""
    before = _vm_entries(cli.vms)
    pids_before = set(qemu_pids_under(cli.home))
    yield
    after = _vm_entries(cli.vms)
    assert after <= before, f"VM dirs or half-removed VMs left behind: {after - before}"
    assert set(qemu_pids_under(cli.home)) <= pids_before, "QEMU process left behind"

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def testbed_image(cli: CLI) -> dict[str, Any]:
    return cli.json("build", str(FIXTURES / "testbed"))


@pytest.fixture(scope="module")
def testbed_vm(cli: CLI, testbed_image: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A running, healthy testbed VM shared by a module's tests."""
    port = free_port()
    cli("up", str(FIXTURES / "testbed"), "--name", "shared", "-p", f"{port}:8080", "--wait", "--timeout", "120")
    try:
        yield {"name": "shared", "port": port}
    finally:
        cli("down", "shared")


@pytest.fixture(scope="session")
def recorder() -> Iterator[Any]:
    """The fault suite's report (test_faults.py, test_hostile.py): one row per scenario,
    written to $MVM_RELIABILITY_REPORT at the end of the session."""
    from .faults import Recorder

    rec = Recorder()
    yield rec
    target = os.environ.get("MVM_RELIABILITY_REPORT")
    if target:
        rec.write(Path(target))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With MVM_REQUIRE_ALL set (CI sets it), a skipped test fails the run: a skip there would
    hide a claim of the README (aarch64 guests, QEMU users of their own, Nix) behind a green
    run, on a host that lacks what the test needs."""
    if not os.environ.get("MVM_REQUIRE_ALL") or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        for report in skipped:
            reporter.write_line(f"MVM_REQUIRE_ALL: a skipped test fails the run: {report.nodeid}: {report.longrepr}",
                                red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
