"""Tables off a terminal (whole rows at their natural width, for grep and awk), and how sizes print."""

from __future__ import annotations

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


def test_guest_text_cannot_drive_or_reorder_the_terminal() -> None:
    # a file name from a guest's volume: an escape sequence, a right-to-left override, markup
    shown = output.safe("a\x1b[2Jb\u202egnp.exe[bold]\tc")
    assert "\x1b" not in shown and "\u202e" not in shown
    assert shown == "a\\x1b[2Jb\\u202egnp.exe\\[bold]\tc"


def test_sizes_given_in_mib_read_back_as_given() -> None:
    # `--memory 512` and `-v ./d:/mnt/d:1024` are MiB: ls, status, up and volume ls print them so
    assert output.mib(512) == "512 MiB"
    assert output.mib(12.44) == "12.4 MiB"  # a measured part of a volume
    assert output.mib(None) == "-"
    assert output.human_bytes(512 * 2**20) == "536.9 MB"  # measured byte counts stay decimal
