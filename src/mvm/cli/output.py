"""Everything the CLI prints goes through here: data on stdout, the rest on stderr.

Progress and spinners are drawn only when stderr is a terminal; in pipes and CI they
degrade to one plain line per stage. ``--json`` output is rendered apart from tables.

Rich is imported when something is drawn, not before: ``exec`` (whose output is the guest's
bytes) and ``--json`` runs do without the ~20 ms its import costs.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from mvm import MvmError

if TYPE_CHECKING:
    from rich.console import Console

#: Control characters (but tab and newline) and the Unicode bidirectional overrides: text
#: from a guest must neither drive the terminal nor reorder what it shows. (The same set as
#: mvm._untrusted's, which the CLI may not import: it sees only mvm's public API.)
_CONTROL = re.compile("[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f\\u202a-\\u202e\\u2066-\\u2069]")


class StdoutClosed(Exception):
    """The reader of stdout went away (`mvmctl ls --json | head`): exit 120, in cli/app.py.
    Not an OSError, which Typer turns into exit 1 when it comes from inside a command."""


@contextmanager
def stdout_guard() -> Iterator[None]:
    """Writes to stdout in this block raise :class:`StdoutClosed` once nobody reads it."""
    try:
        yield
    except BrokenPipeError:
        raise StdoutClosed from None


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """A table cell's text on one line: a check's output of two lines broke its table's rows."""
    if "\n" not in text and "\r" not in text:
        return text
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def safe(text: str) -> str:
    """``text`` with Rich markup escaped and control characters shown as ``\\xNN`` (``\\uNNNN``)."""
    from rich.markup import escape

    return escape(_CONTROL.sub(_shown, text))


@functools.cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class PipeConsole(Console):
        """Rich exits with 1 when the reader of stdout goes away (`mvmctl ls | head`); mvm's
        exit code for that is 120, set in one place (cli/app.py), so the error goes there."""

        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise StdoutClosed

    return PipeConsole


@functools.cache
def console(stderr: bool) -> Console:
    """The console for stdout or stderr (``out`` and ``err``), made on first use."""
    return _console_class()(stderr=stderr, highlight=False, emoji=False, soft_wrap=True)  # ":fire:" stays text


def __getattr__(name: str) -> Console:
    """``output.out`` and ``output.err``: the consoles for stdout and stderr."""
    if name in ("out", "err"):
        return console(stderr=name == "err")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Row = TypeVar("Row")
T = TypeVar("T")
R = TypeVar("R")


def to_jsonable(data: Any) -> Any:
    """Models (one, or a list of them) become their documented JSON form (docs/json.md)."""
    if hasattr(data, "model_dump"):  # a pydantic model (not imported: CLI start-up stays fast)
        return data.model_dump(mode="json", by_alias=True)
    if isinstance(data, list):
        return [to_jsonable(item) for item in data]
    return data


def print_json(data: Any) -> None:
    with stdout_guard():
        sys.stdout.write(json.dumps(to_jsonable(data), indent=2, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()


def print_json_line(data: Any) -> None:
    """One record of a stream (``logs --json``): compact, one per line, flushed at once."""
    with stdout_guard():
        sys.stdout.write(json.dumps(to_jsonable(data), sort_keys=True, default=str) + "\n")
        sys.stdout.flush()


def write_stream(stream: str, data: bytes) -> None:
    """Pass a guest command's output through to our stdout or stderr, unbuffered."""
    target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    with stdout_guard():
        target.write(data)
        target.flush()


def info(message: str) -> None:
    console(stderr=True).print(message)


#: ``--debug`` or MVM_DEBUG, as :func:`mvm.cli.app.main` found it: errors add their kind.
debug = False


def render_error(exc: MvmError) -> None:
    err = console(stderr=True)
    vm = getattr(exc, "vm", None)  # a VMError's: which VM, where the message does not say (`down a b c`)
    named = isinstance(vm, str) and (not vm or re.search(rf"\b{re.escape(vm)}\b", exc.message))
    whose = "" if named or not isinstance(vm, str) else f"{safe(vm)}: "
    err.print(f"[bold red]error:[/] {whose}{safe(exc.message)}")
    if exc.output:
        lines = exc.output.rstrip().splitlines()[-25:]
        err.print("[dim]" + safe("\n".join(f"  | {ln}" for ln in lines)) + "[/]")
    if exc.hint:
        err.print(f"[yellow]hint:[/] {safe(exc.hint)}")
    if debug:
        err.print(f"[dim]error kind: {exc.reference}[/]")
        if getattr(exc, "argv", None):
            err.print(f"[dim]command: {safe(' '.join(exc.argv))}[/]")  # type: ignore[attr-defined]


def each(targets: Iterable[T], action: Callable[[T], R]) -> tuple[list[R], bool]:
    """``action`` on every target, as ``docker rm a b c`` does: a target that fails is
    reported at once and the rest are still tried. Returns the results and whether any
    failed (the command then prints what it did and exits 1)."""
    results: list[R] = []
    failed = False
    for target in targets:
        try:
            results.append(action(target))
        except MvmError as exc:
            render_error(exc)
            failed = True
        except OSError as exc:  # reported as the others are: what was done is still printed
            render_error(MvmError(f"{target}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")))
            failed = True
    return results, failed


@dataclass
class Column(Generic[Row]):
    """One listing column, declared once: header, how to get the value, and layout."""

    header: str
    value: Callable[[Row], object]
    justify: Literal["left", "right"] = "left"
    style: str | None = None
    no_wrap: bool = True


def table(columns: Sequence[Column[Row]], rows: Sequence[Row]) -> None:
    """A borderless table on stdout. In a pipe it is printed at its natural width (nothing
    cut off for ``grep`` or ``awk``); on a narrow terminal, wrapping columns fold and the
    others keep at least their header's width."""
    from rich.measure import Measurement
    from rich.table import Table

    out = console(stderr=False)
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        t.add_column(col.header, justify=col.justify, style=col.style, no_wrap=col.no_wrap,
                     min_width=len(col.header), overflow="ellipsis" if col.no_wrap else "fold")
    for row in rows:
        cells = (col.value(row) for col in columns)
        t.add_row(*(safe(one_line("-" if cell is None or cell == "" else str(cell))) for cell in cells))
    if out.is_terminal:
        out.print(t)
        return
    # Console.print caps width at the console's (80 off a terminal): print through one as
    # wide as the table
    natural = Measurement.get(out, out.options.update_width(100_000), t).maximum
    _console_class()(file=out.file, width=natural, highlight=False, emoji=False, color_system=None).print(t, crop=False)


class StageProgress:
    """``mvm._api.Progress`` drawn with a Rich status spinner (or plain lines off a tty)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.started = time.monotonic()
        self._status: Any = None
        self._stage = ""
        self._text = ""  #: the step's latest output line

    def __enter__(self) -> StageProgress:
        # Off a terminal, Rich is not imported for plain lines: ~20 ms sooner to the machine.
        if sys.stderr.isatty() and (err := console(stderr=True)).is_terminal:
            self._status = err.status(self)  # drawn through __rich__ on every refresh
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    def stage(self, name: str) -> None:
        self._stage, self._text = name, ""
        if self._status is None:
            sys.stderr.write(f"{self.title}: {name}\n")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        info(f"note: {text}")  # above the spinner, and kept

    def line(self, text: str) -> None:
        if text.strip():
            self._text = text.strip()

    def __rich__(self) -> str:
        """One terminal line, made again on each of the spinner's refreshes (so the elapsed
        time moves while a step prints nothing): the step, the time it has taken, then as
        much of the step's latest output line as fits. Shortened here, not cropped by the
        terminal, which would take the elapsed time with it."""
        if not self._stage:
            return safe(self.title)
        step = f"{self.title}: {self._stage}"
        elapsed = f"({time.monotonic() - self.started:.0f}s)"
        room = (self._status.console.width if self._status is not None else 80) - 3  # the spinner and its gap
        if len(step) + 1 + len(elapsed) > room:
            step = step[:max(0, room - len(elapsed) - 2)] + "…"
        room -= len(step) + 1 + len(elapsed)
        text = self._text
        shown = text if len(text) < room else (text[:room - 2] + "…" if room > 8 else "")
        return f"{safe(step)} [dim]{elapsed}" + (f" {safe(shown)}" if shown else "") + "[/]"


@contextmanager
def progress(title: str) -> Iterator[StageProgress]:
    with StageProgress(title) as p:
        yield p


def human_bytes(value: int | None) -> str:
    """Sizes as every command prints them: decimal units (``324.3 MB``), ``-`` when unknown."""
    from rich.filesize import decimal

    return "-" if value is None else decimal(value)


def mib(value: float | None) -> str:
    """Sizes given in MiB (memory, a volume's SIZE_MB) as every command prints them: ``512 MiB``,
    ``12.3 MiB`` for a measured part of one, ``-`` when unknown. Not :func:`human_bytes`: a user
    who asked for 512 should read 512 back, not ``536.9 MB``."""
    if value is None:
        return "-"
    return f"{value} MiB" if isinstance(value, int) else f"{value:.1f} MiB"


def human_secs(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m{value % 60:02d}s"
    return f"{value // 3600}h{(value % 3600) // 60:02d}m"


@contextmanager
def json_of_a_vm_left_running(as_json: bool) -> Iterator[None]:
    """`up`/`restart --wait --json`: when the wait gives up and the VM is kept for inspection,
    its ``VMInfo`` still goes to stdout (then the error to stderr, exit 1), so that a script
    learns what was left running, and can bring it down."""
    import mvm

    try:
        yield
    except (mvm.HealthTimeout, mvm.ServiceFailed) as exc:
        if as_json:
            try:
                print_json(mvm.get(exc.vm).info(ask_guest=True))
            except mvm.MvmError:
                pass  # not kept (a template maker's VM): only the error
        raise
