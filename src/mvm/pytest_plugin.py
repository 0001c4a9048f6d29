"""pytest plugin: real microVMs as test fixtures (docs/testing.md).

Registered through the ``pytest11`` entry point, so pytest loads it wherever mvm is
installed (``-p mvm.pytest_plugin`` loads it explicitly, ``-p no:mvm.pytest_plugin`` turns it off). It is
inert until a test asks for one of its fixtures: loading it imports only ``mvm``'s lazy
package, and its hooks return at once while no VM was started.

    def test_page(mvm_vm):
        vm = mvm_vm("examples/hello", ports=[8080])
        assert urlopen(vm.url(8080)).read() == b"<h1>Hello from mvm!</h1>\\n"
        assert vm.exec("cat", "/tmp/www/index.html").exit_code == 0

Fixtures: ``mvm_vm`` (a factory; its VMs are brought down when the test ends),
``mvm_vm_module`` and ``mvm_vm_session`` (the same, for a module or the session), and
``mvm_layout`` (where VMs live: ``MVM_HOME``/``MVM_STATE``/``MVM_CACHE`` as for ``mvmctl``;
override it in a conftest.py to put them elsewhere). The machinery is :mod:`mvm.testing`.

Teardown runs when the fixture's scope ends, whether the test passed, failed or errored;
Ctrl-C (and, while VMs run, SIGTERM) tears down too. A run killed outright leaves its VMs
to the next run, which removes them. ``--mvm-keep`` keeps the VMs of failed tests and
prints how to reach them. A failed test's report gets the tail of its VMs' logs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

import mvm

if TYPE_CHECKING:
    from .testing import FixtureVM, Pool, VMFactory

_POOL = pytest.StashKey["Pool"]()
#: the key of this plugin's lines in ``report.user_properties`` (they reach the xdist controller)
PROPERTY = "mvm"
LOG_LINES = 40


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mvm", "mvm microVM fixtures")
    group.addoption("--mvm-keep", action="store_true", default=False,
                    help="keep the VMs of failed tests running, and print how to reach them")


@pytest.fixture(scope="session")
def mvm_layout() -> mvm.paths.Layout:
    """Where the fixtures' VMs, images and templates live (the environment's, as ``mvmctl``'s)."""
    return mvm.paths.Layout.default()


@pytest.fixture(scope="session")
def _mvm_pool(request: pytest.FixtureRequest, mvm_layout: mvm.paths.Layout) -> Iterator[Pool]:
    from .testing import Pool

    pool = Pool(mvm_layout, worker=_worker())
    request.config.stash[_POOL] = pool
    restore = _terminate_gracefully()
    try:
        yield pool
    finally:
        try:
            pool.close()
        finally:
            restore()


def _factory(request: pytest.FixtureRequest, pool: Pool, owner: str) -> Iterator[VMFactory]:
    from .testing import VMFactory

    factory = VMFactory(pool, owner)
    yield factory
    keep = bool(request.config.getoption("mvm_keep")) and factory.failed
    for kept in factory.finish(keep=keep):
        pool.notes.append(kept.describe())


@pytest.fixture()
def mvm_vm(request: pytest.FixtureRequest, _mvm_pool: Pool) -> Iterator[VMFactory]:
    """``vm = mvm_vm("path/to/guest", ports=[8080], env={...}, volumes=[...])``: a running VM
    for this test, brought down when the test ends (see :class:`mvm.testing.VMFactory`)."""
    yield from _factory(request, _mvm_pool, request.node.nodeid)


@pytest.fixture(scope="module")
def mvm_vm_module(request: pytest.FixtureRequest, _mvm_pool: Pool) -> Iterator[VMFactory]:
    """As ``mvm_vm``, for VMs shared by a module's tests (brought down after its last test)."""
    yield from _factory(request, _mvm_pool, f"a test of {request.node.nodeid}")


@pytest.fixture(scope="session")
def mvm_vm_session(request: pytest.FixtureRequest, _mvm_pool: Pool) -> Iterator[VMFactory]:
    """As ``mvm_vm``, for VMs shared by the whole session (per xdist worker)."""
    yield from _factory(request, _mvm_pool, "a test of the session")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    testing = sys.modules.get("mvm.testing")
    if testing is None:  # no VM was asked for in this session
        return report
    if report.failed and report.when in ("setup", "call"):
        for factory in [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, testing.VMFactory)]:
            factory.failed = True
            for vm in factory.vms:
                tail = _tail(vm)
                if tail is not None:
                    report.sections.append((f"mvm VM {vm.name} (last {LOG_LINES} lines of its console and services)",
                                             tail))
    pool = item.config.stash.get(_POOL, None)
    if pool is not None and report.when == "teardown":
        report.user_properties.extend((PROPERTY, note) for note in pool.notes)
        pool.notes.clear()
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_Summary(), "mvm-summary")


class _Summary:
    """Collects this plugin's lines from the reports (in the xdist controller, those the
    workers sent) and prints them at the end of the run."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.lines += [str(value) for key, value in report.user_properties if key == PROPERTY]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.section("mvm")
            for line in self.lines:
                terminalreporter.line(line)


def _tail(vm: FixtureVM) -> str | None:
    """Its last log lines; None for a VM that never started (its ``up`` refused the input)."""
    try:
        return vm.log_tail(LOG_LINES) or "(nothing logged)"
    except mvm.VMNotFound:
        return None
    except mvm.MvmError as exc:
        return f"(no logs: {exc.message})"


def _worker() -> str | None:
    return os.environ.get("PYTEST_XDIST_WORKER")


def _terminate_gracefully() -> Callable[[], object]:
    """While VMs may run, SIGTERM interrupts like Ctrl-C, so teardown brings them down
    (only where SIGTERM would otherwise kill the process outright). Returns the undo."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)
