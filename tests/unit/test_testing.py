"""The pytest plugin's machinery (mvm.testing) on the fake backend, and the plugin's promise to
stay inert; real VMs are in tests/e2e/test_pytest_plugin.py."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

import mvm
from mvm.backends.fake import FakeBackend
from mvm.builders.store import Image
from mvm.paths import Layout
from mvm.testing import FixtureVM, Pool, VMFactory, sanitize, source

pytest_plugins = ["pytester"]


def _vm(layout: Layout, fake: FakeBackend, image: Image, name: str, **kwargs: object) -> FixtureVM:
    mvm.up(image=image, name=name, layout=layout, backend=fake, boot_timeout=5, **kwargs)  # type: ignore[arg-type]
    return FixtureVM(name, layout)


def test_names_and_sources(tmp_path: Path) -> None:
    assert sanitize("Test_Web::Case[1]") == "test-web-case-1"
    assert sanitize("---") == "vm" and len(sanitize("x" * 100)) == 24
    (tmp_path / "toml").mkdir()
    (tmp_path / "toml" / "mvm.toml").write_text("")
    (tmp_path / "flake").mkdir()
    (tmp_path / "flake" / "flake.nix").write_text("")
    assert source(tmp_path / "toml", None) == (str(tmp_path / "toml"), None)
    assert source(tmp_path / "flake", None) == (".", str(tmp_path / "flake"))
    assert source("github:me/app#guest", None) == (".", "github:me/app#guest")
    assert source(".#guest", None) == (".", ".#guest")
    assert source("missing/dir", None) == ("missing/dir", None)  # the build says what is missing
    assert source("ignored", "path:/x") == (".", "path:/x")


def test_the_handle_gives_urls_and_spreads_argv(layout: Layout, fake: FakeBackend, image: Image,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.builders.store import ImageStore

    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)  # for restart
    vm = _vm(layout, fake, image, "web", ports=["8080", "5353/udp"])
    port = vm.host_port(8080)
    assert port > 0 and vm.url(8080) == f"http://127.0.0.1:{port}" and vm.url(8080, "/x") == vm.url(8080) + "/x"
    assert vm.host_port(5353, "udp") > 0
    with pytest.raises(mvm.UsageError, match="forwards no host port to guest port 9090/tcp"):
        vm.url(9090)
    assert vm.exec("echo", "hi").stdout == b"echo hi\n"  # the fake agent echoes its argv
    assert vm.exec(["echo", "hi"]).stdout == b"echo hi\n"
    with pytest.raises(mvm.UsageError, match="the command's words"):
        vm.exec("echo", ["hi"])
    assert vm.wait_healthy().health == "healthy" and vm.status is mvm.VMStatus.RUNNING
    assert vm.restart() is vm and vm.status is mvm.VMStatus.RUNNING and vm.host_port(8080) == port
    vm.down()


def _dead_owner(layout: Layout, token: str, vms: list[str]) -> None:
    """The files a pool leaves when its process is killed: a lock nobody holds, a record."""
    owners = layout.state / "pytest"
    owners.mkdir(parents=True, exist_ok=True)
    (owners / f"{token}.lock").touch()
    (owners / f"{token}.json").write_text(json.dumps({"pid": 4242, "worker": "gw1", "vms": vms}))


def test_a_new_pool_removes_the_vms_of_a_killed_one(layout: Layout, fake: FakeBackend, image: Image) -> None:
    _vm(layout, fake, image, "orphan")
    _dead_owner(layout, "dead01", ["orphan", "never-started"])
    alive = Pool(layout, worker="gw0")
    assert [row.name for row in mvm.ls(layout=layout)] == []
    assert alive.notes == ["removed VM orphan, left running by a test run that was killed (pid 4242, "
                           "xdist worker gw1)"]
    assert not (layout.state / "pytest" / "dead01.json").exists()
    assert not [m for m in fake.machines.values() if m.running]
    assert not (layout.retained_logs / "orphan").exists()  # nothing of it stays
    assert not (layout.state / "pytest").exists()  # a pool without VMs leaves no files
    alive.claim("starting")  # a live pool (its lock held) is left alone
    other = Pool(layout)
    other.claim("mine")
    assert other.notes == [] and (layout.state / "pytest" / f"{alive.token}.json").exists()
    alive.close()  # "starting" never started: nothing to stop
    assert sorted(p.name for p in (layout.state / "pytest").iterdir()) == [f"{other.token}.json",
                                                                            f"{other.token}.lock"]
    other.close()
    assert not (layout.state / "pytest").exists()


def test_a_pool_records_its_vms_before_they_start(layout: Layout) -> None:
    pool = Pool(layout, worker="gw3")
    name = pool.new_name("Web Server")
    assert name == f"web-server-gw3-{pool.token}-1"
    pool.claim(name)
    record = json.loads((layout.state / "pytest" / f"{pool.token}.json").read_text())
    assert record["vms"] == [name] and record["pid"] == os.getpid() and record["worker"] == "gw3"
    fd = os.open(layout.state / "pytest" / f"{pool.token}.lock", os.O_RDWR)
    with pytest.raises(BlockingIOError):  # held while the pool lives
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    pool.release(name)  # its last VM gone, the pool lets go of its files
    assert not (layout.state / "pytest").exists()
    pool.claim(name)
    pool.close()  # the named VM never started: nothing to stop, and nothing stays
    assert not (layout.state / "pytest").exists()


def test_finish_brings_down_or_keeps_and_says_how_to_reach(layout: Layout, fake: FakeBackend,
                                                           image: Image) -> None:
    pool = Pool(layout)
    factory = VMFactory(pool, "test_x.py::test_y")
    for name in ("a", "b"):
        pool.claim(name)
        factory.vms.append(_vm(layout, fake, image, name, ports=["8080"]))
    kept = factory.finish(keep=True)
    assert [k.name for k in kept] == ["b", "a"] and factory.vms == []
    text = kept[0].describe()
    port = FixtureVM("b", layout).host_port(8080)
    assert text.splitlines() == [
        "kept VM b (test_x.py::test_y failed)",
        f"  port:   http://127.0.0.1:{port} -> guest 8080/tcp",
        f"  shell:  MVM_STATE={layout.state} mvmctl console b",  # not where mvmctl looks by default
        f"  logs:   MVM_STATE={layout.state} mvmctl logs b",
        f"  remove: MVM_STATE={layout.state} mvmctl down b",
    ]
    pool.close()  # kept VMs are disowned: closing the pool leaves them running
    assert sorted(row.name for row in mvm.ls(layout=layout)) == ["a", "b"]
    pool = Pool(layout)
    factory = VMFactory(pool, "test_x.py::test_z")
    pool.claim("a")
    factory.vms.append(FixtureVM("a", layout))
    assert factory.finish() == []
    assert [row.name for row in mvm.ls(layout=layout)] == ["b"] and not (layout.retained_logs / "a").exists()
    mvm.down("b", layout=layout)
    pool.close()


def test_the_plugin_is_there_and_inert(pytester: pytest.Pytester) -> None:
    """Loaded through the entry point; until a test asks for a VM it imports nothing but
    mvm's lazy package (no orchestration, no mvm.testing) and starts nothing."""
    pytester.makepyfile(test_plain="""
import sys

def test_plain(request):
    assert "mvm.pytest_plugin" in sys.modules
    assert request.config.getoption("mvm_keep") is True
    assert not [m for m in ("mvm.testing", "mvm._api", "mvm.backends") if m in sys.modules]
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--mvm-keep")
    result.assert_outcomes(passed=1)
    assert "mvm" not in [line.strip("= ") for line in result.outlines]  # no summary section
    fixtures = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures").stdout.str()
    for name in ("mvm_vm ", "mvm_vm_module ", "mvm_vm_session ", "mvm_layout "):
        assert name in fixtures
    off = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:mvm.pytest_plugin", "--fixtures")
    assert "mvm_vm" not in off.stdout.str()


def test_docs_testing_shows_the_example_that_is_tested() -> None:
    """docs/testing.md quotes examples/notes whole; tests/e2e/test_pytest_plugin.py runs it."""
    root = Path(__file__).parents[2]
    doc = (root / "docs" / "testing.md").read_text()
    for name in ("test_notes.py", "mvm.toml", "server.py"):
        text = (root / "examples" / "notes" / name).read_text().rstrip("\n")
        assert f"```{'toml' if name.endswith('.toml') else 'python'}\n{text}\n```" in doc, \
            f"docs/testing.md's copy of examples/notes/{name} differs from the file"
    for name in ("mvm_vm", "mvm_vm_module", "mvm_vm_session", "mvm_layout", "--mvm-keep"):
        assert f"`{name}`" in doc
