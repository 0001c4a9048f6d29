"""A host disk that fills up (issue 11, item 4): refused before anything is written where
mvm can know the size, and a one-line error (never a traceback) where it cannot. The fault
suite does the same on real small tmpfs mounts (tests/e2e/test_hostile.py)."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import pytest

import mvm
from mvm._proc import DEFAULT_RUNNER
from mvm.cli import app
from mvm.errors import CommandFailed, DiskFull
from mvm.paths import Layout
from mvm.runtime.registry import Registry, VMRecord


def _free(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> None:
    real = os.statvfs

    def statvfs(path: object) -> os.statvfs_result:
        fields = list(real(path))  # type: ignore[arg-type]
        fields[0] = fields[1] = 4096
        fields[4] = free_bytes // 4096
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)


def test_up_is_refused_before_a_vm_dir_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    _free(monkeypatch, 100 << 20)
    with pytest.raises(DiskFull, match="has 100 MiB free; a VM .* needs 128 MiB; nothing was written") as info:
        Registry(layout).reserve(VMRecord(name="web"))
    assert info.value.hint and "MVM_HOME" in info.value.hint
    assert list(layout.vms.iterdir()) == []


def test_a_child_that_runs_out_of_space_says_so() -> None:
    with pytest.raises(CommandFailed) as info:
        DEFAULT_RUNNER.run([sys.executable, "-c", "import sys; print('tar: x: Cannot write: No space left on device');"
                            " sys.exit(2)"], desc="unpacking")
    assert info.value.message == "unpacking failed (exit code 2): a disk is full (No space left on device)"
    assert info.value.hint == DiskFull.HINT


def test_enospc_anywhere_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def full(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device", "/state/vms/web/config.img")

    monkeypatch.setattr(mvm, "ls", full)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_:
            app.main(["ls"])
    finally:
        for sig, handler in handlers.items():  # main() installs the CLI's own
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "error: the disk is full (No space left on device) writing /state/vms/web/config.img" in err
    assert "Traceback" not in err and "hint: free some space" in err
