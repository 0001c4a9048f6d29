"""Tables off a terminal (whole rows at their natural width, for grep and awk), and how sizes print."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvm.cli import output
from mvm.cli.output import Column


def test_a_piped_table_is_never_wrapped_or_cut(capsys: pytest.CaptureFixture[str]) -> None:
    host = "/tmp/" + "deep/" * 30 + "data"
    rows = [("data-1a2b3c4d", "web", host)]
    output.table([Column[tuple[str, str, str]]("NAME", lambda r: r[0]),
                  Column[tuple[str, str, str]]("VM", lambda r: r[1]),
                  Column[tuple[str, str, str]]("HOST", lambda r: r[2], no_wrap=False)], rows)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # the header and one row, however long
    assert lines[1].split() == ["data-1a2b3c4d", "web", host]


def test_a_cell_of_several_lines_keeps_its_row_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A health check's output of two lines ("nope\nwww-data") broke `status`'s table (hands-on)."""
    output.table([Column[tuple[str, str]]("NAME", lambda r: r[0]),
                  Column[tuple[str, str]]("LAST OUTPUT", lambda r: r[1], no_wrap=False)],
                 [("web", "nope\n\nwww-data\n")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].split(None, 1) == ["web", "nope / www-data"]


def test_guest_text_cannot_drive_or_reorder_the_terminal() -> None:
    # a file name from a guest's volume: an escape sequence, a right-to-left override, markup
    shown = output.safe("a\x1b[2Jb\u202egnp.exe[bold]\tc")
    assert "\x1b" not in shown and "\u202e" not in shown
    assert shown == "a\\x1b[2Jb\\u202egnp.exe\\[bold]\tc"


def test_emoji_codes_in_text_print_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """A request for /:fire:/ in a guest's log, a dir named a:fire:b, -v ...:secret:64: Rich
    turned the codes into emoji, rewriting guest text, paths and the user's own words."""
    output.out.print(output.safe('"GET /:fire:/:secret: HTTP/1.1" 200'))
    output.table([Column[str]("HOST", lambda r: r)], ["/tmp/a:fire:b"])
    shown = capsys.readouterr().out
    assert '"GET /:fire:/:secret: HTTP/1.1" 200' in shown and "/tmp/a:fire:b" in shown


def test_sizes_given_in_mib_read_back_as_given() -> None:
    # `--memory 512` and `-v ./d:/mnt/d:1024` are MiB: ls, status, up and volume ls print them so
    assert output.mib(512) == "512 MiB"
    assert output.mib(12.44) == "12.4 MiB"  # a measured part of a volume
    assert output.mib(None) == "-"
    assert output.human_bytes(512 * 2**20) == "536.9 MB"  # measured byte counts stay decimal


def test_a_reader_that_goes_away_is_exit_120_as_documented(tmp_path: Path) -> None:
    """Rich's own handler exited 1, which a script cannot tell from an mvm error."""
    env = {**os.environ, "MVM_HOME": str(tmp_path)}
    for command in (["doctor"], ["ls"], ["images"], ["ls", "--json"], ["images", "--json"], ["doctor", "--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "mvm", *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        proc.stdout.close()  # the reader is gone before anything is written
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 120, (command, proc.returncode, err)
        assert b"Traceback" not in err


def test_an_error_about_a_vm_names_it_once(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`down a b c` reports each failure among the others: each must say which VM it was."""
    from mvm.errors import AgentError, VMNotFound

    monkeypatch.setattr(output, "debug", False)  # an earlier in-process `main --debug` may have set it

    output.render_error(AgentError("web-2", "lost the connection to the agent"))
    output.render_error(VMNotFound("web", "no VM named 'web'"))
    assert capsys.readouterr().err.splitlines() == [
        "error: web-2: lost the connection to the agent",
        "hint: `mvmctl status web-2` and `mvmctl logs web-2` show what the VM is doing",  # an agent error's default
        "error: no VM named 'web'"]


def test_a_long_build_line_leaves_the_elapsed_time_in_view(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from rich.text import Text

    prog = output.StageProgress("building")
    prog._status = SimpleNamespace(console=SimpleNamespace(width=80))
    now = prog.started + 93
    monkeypatch.setattr(output.time, "monotonic", lambda: now)

    def drawn() -> str:  # what the spinner shows on its next refresh
        return Text.from_markup(prog.__rich__()).plain

    prog.stage("installing packages (" + ", ".join(f"package{i}" for i in range(12)) + ") with mmdebstrap")
    assert len(drawn()) <= 77 and "(93s)" in drawn(), drawn()
    prog.line("Setting up libpython3.11-stdlib:arm64 (3.11.2-6+deb12u6) ... and a good deal more text")
    assert len(drawn()) <= 77 and "(93s)" in drawn(), drawn()
    prog.stage("fetching the guest kernel (arm64)")
    prog.line("Setting up libpython3.11-stdlib:arm64 (3.11.2-6+deb12u6) ... and a good deal more text")
    plain = drawn()
    assert plain.startswith("building: fetching the guest kernel (arm64) (93s) Setting up") and plain.endswith("…")
    assert len(plain) == 77
    now += 41  # a step that prints nothing for 41 s: its time still moves (it froze until a line came)
    assert "(134s)" in drawn()


def test_each_tries_every_target_and_reports_each_failure(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.errors import VMNotFound

    monkeypatch.setattr(output, "debug", False)

    def act(name: str) -> str:
        if name == "b":
            raise VMNotFound("b", "no VM named 'b'")
        if name == "c":
            raise PermissionError(13, "Permission denied", "/state/vms/c")
        return name.upper()

    assert output.each(["a", "b", "c", "d"], act) == (["A", "D"], True)
    assert capsys.readouterr().err.splitlines() == [
        "error: no VM named 'b'", "error: c: Permission denied (/state/vms/c)"]
