"""The registry under concurrency and failure: a VM removed while another command waits for
its lock, a reservation cut short, removals that leave nothing half there."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mvm import _atomic
from mvm._api.cleanup import cleanup
from mvm.errors import VMNotFound
from mvm.paths import Layout
from mvm.runtime import registry as registry_module
from mvm.runtime.registry import Registry, VMRecord


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(state=tmp_path / "state", cache=tmp_path / "cache")


def test_a_command_waiting_while_the_vm_is_removed_finds_it_gone(layout: Layout) -> None:
    """`down` removed the VM while `forward` waited for its lock: `forward` used to recreate
    the VM dir (the lock file was in it) and then fail with a traceback, leaving a VM that
    `ls` showed as broken and whose name `up` refused."""
    registry = Registry(layout)
    files = registry.reserve(VMRecord(name="web"))
    outcome: list[BaseException | None] = []

    def waiter() -> None:
        try:
            registry.update("web", lambda r: setattr(r, "phase", "running"))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)

    with registry.locked("web"):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)  # the waiter has seen the VM dir and waits for the lock
        _atomic.remove_tree(files.root)  # what Registry.remove does under the lock
    thread.join(10)
    assert isinstance(outcome[0], VMNotFound)
    assert not files.root.exists()
    assert registry.names() == []
    assert not files.lock.exists()  # the file its lock wait made (or kept) goes with the VM


def test_remove_takes_the_lock_and_leaves_no_dir(layout: Layout) -> None:
    registry = Registry(layout)
    files = registry.reserve(VMRecord(name="web"))
    (files.root / "console.log").write_text("boot\n")
    registry.remove("web")
    assert not files.root.exists()
    assert [p.name for p in layout.vms.iterdir()] == [".locks"]  # no trash left
    assert list((layout.vms / ".locks").iterdir()) == []  # nor its lock file
    with pytest.raises(VMNotFound):
        registry.update("web", lambda r: None)
    assert not files.root.exists()  # the failed update made nothing


_WAITER = """
import sys, time
from pathlib import Path
from mvm.paths import Layout
from mvm.runtime.registry import Registry
registry = Registry(Layout(state=Path(sys.argv[1]), cache=Path(sys.argv[2])))
print("waiting", flush=True)
with registry.locked("web"):  # as `up web` claims the name
    print("locked", flush=True)
    time.sleep(30)
"""


def test_a_lock_file_unlinked_by_remove_is_not_held_by_its_waiter(layout: Layout) -> None:
    """`remove` unlinks the VM's lock file while it holds it. A command of another process
    waiting for it (`up web` claiming the name) must then hold the file now at the path,
    not the unlinked one, or a third command (another `up web`) would run beside it."""
    import subprocess
    import sys

    from mvm._locks import held

    registry = Registry(layout)
    files = registry.reserve(VMRecord(name="web"))
    with subprocess.Popen([sys.executable, "-c", _WAITER, str(layout.state), str(layout.cache)],
                          stdout=subprocess.PIPE, text=True) as waiter:
        assert waiter.stdout is not None
        try:
            with registry.locked("web"):
                assert waiter.stdout.readline() == "waiting\n"
                time.sleep(0.5)  # it has opened the lock file and waits in flock
                _atomic.remove_tree(files.root)  # what Registry.remove does under the lock
                files.lock.unlink()
            assert waiter.stdout.readline() == "locked\n"
            assert files.lock.exists() and held(files.lock)
        finally:
            waiter.kill()


def test_a_reservation_cut_short_frees_the_name(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(layout)

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(registry_module, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.reserve(VMRecord(name="web"))
    assert registry.names() == []
    monkeypatch.undo()
    registry.reserve(VMRecord(name="web"))  # the name is free again
    assert registry.names() == ["web"]


def test_cleanup_removes_cut_short_removals_and_locks_of_gone_vms(layout: Layout) -> None:
    registry = Registry(layout)
    registry.reserve(VMRecord(name="web"))
    registry.reserve(VMRecord(name="db"))
    registry.update("web", lambda r: None)  # makes web's lock file
    registry.update("db", lambda r: None)
    registry.remove("web")
    assert not (layout.vms / ".locks" / "web.lock").exists()
    (layout.vms / ".locks" / "web.lock").touch()  # as a VM killed by a power cut leaves it
    trash = layout.images / ".trash-abc-1-2"
    (trash / "rootfs").mkdir(parents=True)
    dry = cleanup(layout, dry_run=True)
    paths = {item.path for item in dry.items}
    assert str(trash) in paths
    assert str(layout.vms / ".locks" / "web.lock") in paths
    assert str(layout.vms / ".locks" / "db.lock") not in paths  # db still exists
    cleanup(layout)
    assert not trash.exists()
    assert not (layout.vms / ".locks" / "web.lock").exists()
    assert (layout.vms / ".locks" / "db.lock").exists()


def test_remove_tree_is_one_rename_then_the_delete(tmp_path: Path) -> None:
    victim = tmp_path / "img"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "f").write_text("x")
    _atomic.remove_tree(victim)
    assert list(tmp_path.iterdir()) == []
    _atomic.remove_tree(victim)  # already gone: nothing to do


def test_replace_tree_never_leaves_neither(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = tmp_path / "layer", tmp_path / ".build-1"
    old.mkdir()
    (old / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    real_rename = _atomic.os.rename

    def failing_second(src: object, dst: object) -> None:
        if src == new:
            raise OSError(5, "I/O error")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(_atomic.os, "rename", failing_second)
    with pytest.raises(OSError):
        _atomic.replace_tree(new, old)
    assert (old / "v").read_text() == "old" and not _atomic.trash_in(tmp_path)  # the old one is back
    monkeypatch.setattr(_atomic.os, "rename", real_rename)
    _atomic.replace_tree(new, old)
    assert (old / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["layer"]
    fresh = tmp_path / ".build-2"
    fresh.mkdir()
    _atomic.replace_tree(fresh, tmp_path / "other")  # nothing there before
    assert (tmp_path / "other").is_dir()


def test_a_full_disk_does_not_keep_a_vm_from_going(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """No room for the lock file (it is made on first use): the VM goes all the same."""
    import errno
    from contextlib import contextmanager

    registry = Registry(layout)
    files = registry.reserve(VMRecord(name="web"))

    @contextmanager
    def full(name: str):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")
        yield

    monkeypatch.setattr(registry, "locked", full)
    registry.remove("web")
    assert not files.root.exists()


@pytest.mark.parametrize("name", ["../images", ".locks", "Web", "a/b", ""])
def test_a_name_no_vm_can_have_is_refused_before_any_path_is_made(layout: Layout, name: str) -> None:
    """`down ../images` removed the image store, and `down .locks` every VM's lock file."""
    import mvm

    (layout.images / "k").mkdir(parents=True)
    with pytest.raises(mvm.UsageError, match="is not a VM name"):
        mvm.down(name, layout=layout)
    assert (layout.images / "k").is_dir()
    (layout.vms / "Odd").mkdir(parents=True)  # made by hand: not listed, and `ls` still works
    assert Registry(layout).names() == [] and mvm.ls(layout=layout) == []


def test_try_flock_is_exclusive_and_takes_the_file_at_the_path(tmp_path: Path) -> None:
    import os

    from mvm._locks import held, try_flock

    path = tmp_path / "v.lock"
    first = try_flock(path)
    assert first is not None and held(path)
    assert try_flock(path) is None  # another open file description: refused at once
    os.unlink(path)  # what `volume rm` does while holding it
    again = try_flock(path, verify=True)
    assert again is not None and os.fstat(again).st_ino == os.stat(path).st_ino
    os.close(first)
    os.close(again)
    assert not held(path)
