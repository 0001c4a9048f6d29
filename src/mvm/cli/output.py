"""Everything the CLI prints goes through here: data on stdout, the rest on stderr.

Progress and spinners are drawn only when stderr is a terminal; in pipes and CI they
degrade to one plain line per stage. ``--json`` output is rendered apart from tables.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import MvmError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def write_stream(stream: str, data: bytes) -> None:
    """Pass a guest command's output through to our stdout or stderr, unbuffered."""
    target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    target.write(data)
    target.flush()


def info(message: str) -> None:
    err.print(message)


def render_error(exc: MvmError, debug: bool = False) -> None:
    err.print(f"[bold red]error:[/] {escape(exc.message)}")
    if exc.output:
        lines = exc.output.rstrip().splitlines()[-25:]
        err.print("[dim]" + escape("\n".join(f"  | {ln}" for ln in lines)) + "[/]")
    if exc.hint:
        err.print(f"[yellow]hint:[/] {escape(exc.hint)}")
    if debug:
        err.print(f"[dim]error kind: {exc.reference}[/]")
        if getattr(exc, "argv", None):
            err.print(f"[dim]command: {escape(' '.join(exc.argv))}[/]")  # type: ignore[attr-defined]


@dataclass
class Column:
    """One listing column, declared once: header, how to get the value, and layout."""

    header: str
    key: str
    justify: str = "left"
    style: str | None = None
    no_wrap: bool = True


def table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> None:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        t.add_column(col.header, justify=col.justify, style=col.style, no_wrap=col.no_wrap)  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*(escape(str(row.get(col.key, "") if row.get(col.key) is not None else "-"))
                    for col in columns))
    out.print(t)


class StageProgress:
    """``mvm._api.Progress`` drawn with a Rich status spinner (or plain lines off a tty)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.started = time.monotonic()
        self._status: Any = None
        self._stage = ""

    def __enter__(self) -> StageProgress:
        if err.is_terminal:
            self._status = err.status(self.title)
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    def stage(self, name: str) -> None:
        self._stage = name
        elapsed = time.monotonic() - self.started
        if self._status is not None:
            self._status.update(f"{self.title}: {name} [dim]({elapsed:.1f}s)[/]")
        else:
            err.print(f"{self.title}: {name}")

    def line(self, text: str) -> None:
        if self._status is not None and text.strip():
            elapsed = time.monotonic() - self.started
            short = escape(text.strip()[:90])
            self._status.update(f"{self.title}: {self._stage} [dim]({elapsed:.0f}s) {short}[/]")


@contextmanager
def progress(title: str) -> Iterator[StageProgress]:
    with StageProgress(title) as p:
        yield p


def human_secs(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m{value % 60:02d}s"
    return f"{value // 3600}h{(value % 3600) // 60:02d}m"
