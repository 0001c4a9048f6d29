"""The pytest plugin (issue 16), driven the way a user runs it: pytest in a subprocess, on a
user's test file, with real VMs restored from a template of examples/hello.

Each test gives the inner run a state dir of its own (the image and template cache is the
suite's), then checks that nothing of the run is left: no QEMU process whose cwd is in that
state dir, no VM dir, no kept logs, no ownership record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mvm

from .conftest import CLI, EXAMPLES, qemu_pids_under, wait_for

pytest_plugins = ["pytester"]

HELLO = str(EXAMPLES / "hello")
PAGE = "<h1>Hello from mvm!</h1>\n"


class Inner:
    """Runs pytest on a user's test file, with the state dir ``home``."""

    def __init__(self, pytester: pytest.Pytester, home: Path) -> None:
        self.pytester = pytester
        self.home = home
        self.layout = mvm.paths.Layout(state=home / "state", cache=Path(os.environ["MVM_CACHE"]))

    def write(self, source: str, name: str = "test_user") -> None:
        self.pytester.makepyfile(**{name: f"HELLO = {HELLO!r}\nPAGE = {PAGE!r}\n" + source})

    def run(self, *args: str, timeout: float = 120) -> pytest.RunResult:
        started = time.monotonic()
        result = self.pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=timeout)
        print(f"inner run {' '.join(args)}: {time.monotonic() - started:.1f}s")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                                cwd=self.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def vms(self) -> list[str]:
        return [row.name for row in mvm.ls(layout=self.layout, health=False)]

    def assert_nothing_left(self) -> None:
        state = self.home / "state"
        assert not qemu_pids_under(self.home), "a QEMU process of the run is still running"
        for sub in ("vms", "logs", "pytest"):  # the VMs' lock files stay in vms/.locks until `cleanup`
            where = state / sub
            left = sorted(p.name for p in where.iterdir() if p.name != ".locks") if where.is_dir() else []
            assert not left, f"left in {state / sub}: {left}"


@pytest.fixture()
def inner(pytester: pytest.Pytester, cli: CLI, hello_image: dict[str, Any],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Inner]:
    home = pytester.path / "home"
    monkeypatch.setenv("MVM_HOME", str(home))
    monkeypatch.setenv("MVM_CACHE", cli.env["MVM_CACHE"])
    for var in ("MVM_STATE", "MVM_TEMPLATES", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(var, raising=False)
    runner = Inner(pytester, home)
    try:
        yield runner
    finally:  # whatever a failed assertion left: never leave a machine running on a shared host
        for name in runner.vms():
            mvm.down(name, layout=runner.layout, keep_logs=False)
        for pid in qemu_pids_under(home):
            os.kill(pid, signal.SIGKILL)


USER_TESTS = """
import urllib.request

def test_passes(mvm_vm):
    vm = mvm_vm(HELLO, ports=[8080])
    assert urllib.request.urlopen(vm.url(8080), timeout=10).read().decode() == PAGE
    assert vm.exec("cat", "/etc/hostname").stdout.decode().strip() == vm.name
    assert vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]).exit_code == 3
    assert vm.status == "running" and vm.info().start == "restored"

def test_fails(mvm_vm):
    vm = mvm_vm(HELLO, ports=[8080])
    assert vm.exec("sh", "-c", "echo oops; exit 3").exit_code == 0
"""

#: two more failures: a VM the test brought down itself, and one whose up refused its input
MORE_FAILURES = """

def test_fails_after_its_own_down(mvm_vm):
    vm = mvm_vm(HELLO, ports=[8080])
    result = vm.exec("sh", "-c", "echo oops; exit 3")
    vm.down()  # the report still shows its logs (those down kept), and teardown drops them
    assert result.exit_code == 0

def test_refused_input(mvm_vm):
    mvm_vm(HELLO, ports=["80800"])  # refused before any VM starts: no VM log section, the hint shown
"""


def test_a_passing_and_a_failing_test_leave_nothing(inner: Inner) -> None:
    inner.write(USER_TESTS + MORE_FAILURES)
    result = inner.run("--durations=0", "-vv")
    result.assert_outcomes(passed=1, failed=3)
    # the failed tests' reports: their VMs' logs (from the template's boot on)
    result.stdout.fnmatch_lines(["*mvm VM hello-*-2 (last 40 lines of its console and services)*",
                                 "*mvm VM hello-*-3 (last 40 lines of its console and services)*"])
    out = result.stdout.str()
    assert out.count("[service hello] running") >= 2
    assert out.count("mvm VM hello-") == 2 and "(no logs:" not in out  # none for a VM that never started
    result.stdout.fnmatch_lines(["E * hint: *"])  # the UsageError's hint, under its message
    inner.assert_nothing_left()
    # fast start is test_passes' `start == "restored"`; its speed is bench/'s to measure


def test_an_interrupted_run_cleans_up(inner: Inner) -> None:
    inner.write("""
import pathlib, time

def test_waits(mvm_vm):
    vm = mvm_vm(HELLO, ports=[8080])
    pathlib.Path("started").write_text(vm.name)
    time.sleep(120)
""")
    for sig in (signal.SIGINT, signal.SIGTERM):
        marker = inner.pytester.path / "started"
        marker.unlink(missing_ok=True)
        proc = inner.popen("-s")
        try:
            wait_for(marker.exists, 60, "the user's test to start its VM")
            assert inner.vms() == [marker.read_text()]
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 2 and "KeyboardInterrupt" in out, out  # pytest's "interrupted"
        inner.assert_nothing_left()


def test_two_xdist_workers_do_not_collide(inner: Inner) -> None:
    inner.write("""
import json, os, time, urllib.request
import pytest

@pytest.mark.parametrize("n", range(4))
def test_vm(mvm_vm, n):
    vm = mvm_vm(HELLO, ports=[8080])
    assert urllib.request.urlopen(vm.url(8080), timeout=10).read().decode() == PAGE
    with open("seen.jsonl", "a") as f:
        f.write(json.dumps({"name": vm.name, "port": vm.host_port(8080), "pid": vm.info().pid,
                            "worker": os.environ["PYTEST_XDIST_WORKER"]}) + "\\n")
    time.sleep(1.0)  # both workers hold a VM at the same time
""")
    result = inner.run("-n", "2")
    result.assert_outcomes(passed=4)
    seen = [json.loads(line) for line in (inner.pytester.path / "seen.jsonl").read_text().splitlines()]
    assert len({s["name"] for s in seen}) == len({s["port"] for s in seen}) == len({s["pid"] for s in seen}) == 4
    assert {s["worker"] for s in seen} == {"gw0", "gw1"}
    assert all(s["name"].startswith(f"hello-{s['worker']}-") for s in seen)
    inner.assert_nothing_left()


def test_keep_keeps_the_failed_tests_vm_only(inner: Inner, monkeypatch: pytest.MonkeyPatch) -> None:
    # The VMs live where the user's conftest says, not where `mvmctl` looks by default: the
    # printed commands then say MVM_STATE=...
    inner.pytester.makeconftest(f"""
from pathlib import Path
import mvm, pytest

@pytest.fixture(scope="session")
def mvm_layout():
    return mvm.paths.Layout(state=Path({str(inner.layout.state)!r}), cache=Path({str(inner.layout.cache)!r}))
""")
    monkeypatch.setenv("MVM_HOME", str(inner.pytester.path / "elsewhere"))
    inner.write(USER_TESTS)
    result = inner.run("--mvm-keep")
    result.assert_outcomes(passed=1, failed=1)
    (kept,) = inner.vms()
    assert kept.endswith("-2")  # test_fails's VM; test_passes's is gone
    result.stdout.fnmatch_lines([
        f"kept VM {kept} (test_user.py::test_fails failed)",
        "  port:   http://127.0.0.1:* -> guest 8080/tcp",
        f"  shell:  MVM_STATE={inner.home / 'state'} mvmctl console {kept}",
        f"  logs:   MVM_STATE={inner.home / 'state'} mvmctl logs {kept}",
        f"  remove: MVM_STATE={inner.home / 'state'} mvmctl down {kept}",
    ])
    info = mvm.get(kept, layout=inner.layout).info()
    assert info.status == "running" and len(qemu_pids_under(inner.home)) == 1
    assert not (inner.home / "state" / "pytest").exists()  # disowned: no later run removes it
    mvm.down(kept, layout=inner.layout, keep_logs=False)
    inner.assert_nothing_left()
    assert not (inner.pytester.path / "elsewhere").exists()


def test_a_killed_workers_vms_are_removed_by_the_next_run(inner: Inner) -> None:
    inner.write("""
import os, pathlib, signal

def test_killed(mvm_vm):
    vm = mvm_vm(HELLO)
    pathlib.Path("started").write_text(vm.name)
    os.kill(os.getpid(), signal.SIGKILL)  # an OOM kill, a CI runner's kill -9 of the worker
""")
    result = inner.run("-n", "1")
    assert "crashed" in result.stdout.str() and result.ret != 0
    name = (inner.pytester.path / "started").read_text()
    assert inner.vms() == [name] and qemu_pids_under(inner.home)  # still running: nobody tore it down
    inner.write("""
def test_next(mvm_vm):
    mvm_vm(HELLO)
""", name="test_user")
    result = inner.run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"removed VM {name}, left running by a test run that was killed (pid *"])
    inner.assert_nothing_left()


def test_the_docs_example_passes(inner: Inner) -> None:
    """docs/testing.md's example (examples/notes: a request through a forwarded port, a file
    checked with exec, a restart survived), run as its reader would, under the repository's
    pytest settings (warnings are errors)."""
    result = inner.run(str(EXAMPLES / "notes"), "--durations=0", "-vv", timeout=600)
    result.assert_outcomes(passed=4)
    inner.assert_nothing_left()
