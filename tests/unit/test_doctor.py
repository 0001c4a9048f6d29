"""What ``doctor`` advises: fixes that work on this machine as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvm._api import doctor


@pytest.mark.parametrize("have_group", [True, False])
def test_the_kvm_fix_creates_the_group_only_where_there_is_none(have_group: bool) -> None:
    fix = doctor.kvm_group_fix(have_group)
    assert fix.endswith("chgrp kvm /dev/kvm && chmod 660 /dev/kvm (udev does this on most distributions)")
    assert fix.startswith("groupadd --system kvm && ") is not have_group


def test_a_group_is_looked_up_by_name() -> None:
    assert doctor.group_exists("root") and not doctor.group_exists("no-such-group-mvm")


@pytest.mark.parametrize(("shown", "missing"), [
    ("build-users-group = nixbld-mvm-none\nsandbox = true\n", "nixbld-mvm-none"),
    ("build-users-group = root\n", None),  # exists
    ("build-users-group = \n", None),  # builds as root, as configured
])
def test_nix_build_users_that_do_not_exist_are_found(monkeypatch: pytest.MonkeyPatch, shown: str,
                                                     missing: str | None) -> None:
    from mvm._proc import Completed
    from mvm.builders import nix

    class Shows:
        def run(self, argv: list[str], **kw: object) -> Completed:
            assert argv[-1] == "show-config"
            return Completed(argv, 0, shown)

    monkeypatch.setattr(nix.os, "geteuid", lambda: 0)
    assert nix.missing_build_group("nix", Shows()) == missing  # type: ignore[arg-type]


def test_a_state_dir_mvm_cannot_use_is_reported(tmp_path: Path) -> None:
    from mvm.paths import Layout

    afile = tmp_path / "afile"
    afile.write_text("")
    disk = doctor.check_disk(Layout(state=afile / "state", cache=tmp_path / "cache"))
    assert not disk.ok and disk.fix is not None and f"{afile} is not a directory" in disk.fix
    fine = doctor.check_disk(Layout(state=tmp_path / "new" / "state", cache=tmp_path / "cache"))
    assert fine.free_bytes > 0 and "MVM_STATE" not in (fine.fix or "")  # made when first needed


def test_doctor_lists_what_each_registered_backend_says_of_itself(tmp_path: Path, fake: object) -> None:
    from mvm.paths import Layout

    rows = doctor.check_backends(Layout(state=tmp_path / "s", cache=tmp_path / "c"))
    names = [row.backend for row in rows]
    assert "fake" in names and "qemu-tcg" in names and "qemu-kvm" in names  # the fake's row, QEMU's two
    assert next(r for r in rows if r.backend == "fake").reason.startswith("machines in this process's memory")


def test_a_backend_that_cannot_be_asked_is_a_row_not_the_end_of_doctor(tmp_path: Path, fake: object,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.errors import MvmError
    from mvm.paths import Layout

    def broken(*args: object) -> list[object]:
        raise MvmError("its probe cache is read-only")

    monkeypatch.setattr(type(fake), "diagnose", broken)
    rows = doctor.check_backends(Layout(state=tmp_path / "s", cache=tmp_path / "c"))
    row = next(r for r in rows if r.backend == "fake")
    assert row.usable is None and row.reason == "could not be asked: its probe cache is read-only"
    assert "qemu-tcg" in [r.backend for r in rows]  # the others still answer


def test_a_tool_that_is_there_but_needs_a_fix_is_not_shown_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """nix's row said "ok" next to "every build --flake fails" (no nixbld group)."""
    import signal

    import mvm
    from mvm._api.models import ToolCheck
    from mvm.cli import app
    from mvm.paths import Layout

    report = doctor.doctor(Layout(state=tmp_path / "s", cache=tmp_path / "c"))
    tools = [ToolCheck(tool="nix", purpose="the Nix front end", found=True, version="2.8.0",
                       fix="as root, nix builds as the users of group 'nixbld', which does not exist"),
             ToolCheck(tool="lz4", purpose="initrd", found=True, version="1.9")]
    report = report.model_copy(update={"tools": tools})
    monkeypatch.setattr(mvm, "doctor", lambda: report)
    monkeypatch.setenv("COLUMNS", "200")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit):
            app.main(["doctor"])
    finally:
        for sig, handler in handlers.items():  # main() installs the CLI's own
            signal.signal(sig, handler)
    rows = {line.split()[1]: line.split()[0] for line in capsys.readouterr().out.splitlines()
            if line.split()[1:2] in (["nix"], ["lz4"])}
    assert rows == {"nix": "fix", "lz4": "ok"}


def test_building_and_booting_are_separate_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing QEMU system emulator stops boots, not builds (mmdebstrap and binfmt build),
    and each missing part has its own fix."""
    from mvm._proc import DEFAULT_RUNNER
    from mvm.builders import arches
    from mvm.names import host_arch

    other = "aarch64" if host_arch() == "x86_64" else "x86_64"
    monkeypatch.setattr(doctor, "find_tool",
                        lambda name: None if name.startswith("qemu-system") else f"/usr/bin/{name}")
    monkeypatch.setattr(arches, "emulation_problem", lambda arch: None)
    monkeypatch.setattr(doctor, "foreign_architectures", lambda runner: {arches.debian(other)})
    for arch in (host_arch(), other):
        row = doctor.check_arch(arch, DEFAULT_RUNNER)  # type: ignore[arg-type]
        assert (row.boots, row.builds) == (False, True)
        assert "cannot boot" in row.reason and "apt-get install qemu-system-" in (row.fix or "")
    monkeypatch.setattr(doctor, "find_tool", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(doctor, "foreign_architectures", lambda runner: set())
    row = doctor.check_arch(other, DEFAULT_RUNNER)  # type: ignore[arg-type]
    assert (row.boots, row.builds) == (True, False) and "apt does not fetch" in row.reason
    assert "qemu-system" not in (row.fix or "") and "dpkg --add-architecture" in (row.fix or "")
