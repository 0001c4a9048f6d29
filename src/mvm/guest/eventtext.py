"""How one event reads as a line: the same for ``mvmctl logs`` on the host and for a
standalone guest's serial console (``kubectl logs``). Stdlib only, and nothing else of
mvm's: the host imports it as it imports ``protocol``.

The host and the guest make each field safe in their own way (the host escapes what a
hostile guest could send; the guest keeps its console on one line), so they pass ``text``.
"""

from __future__ import annotations

import signal

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def exit_text(code: object, text: Callable[[object], str]) -> str:
    """``exit 3``, or ``killed by SIGTERM`` for the negative codes Python reports for a
    process a signal ended."""
    if isinstance(code, int) and not isinstance(code, bool) and -64 <= code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {text(code)}"


def event_line(event: dict[str, Any], ts: str, text: Callable[[object], str],
               output_limit: int | None = None) -> tuple[str, str] | None:
    """(``service``, ``health`` or ``init``; the line) for an event, or None for kinds that
    are not shown. ``ts`` is its time, formatted; ``output_limit`` keeps the end of a health
    check's output."""
    kind = event.get("kind")
    if kind == "log":
        stream = event.get("stream", "stdout")
        svc = text(event.get("svc", "?"))
        tag = svc if stream in ("stdout", "stderr") else f"{svc} {text(stream)}"
        return "service", f"{ts} {tag} | {text(event.get('line', ''))}"
    if kind == "service":
        detail = [exit_text(event[key], text) if key == "exit" else f"{key} {text(event[key])}"
                  for key in ("pid", "exit", "delay", "reason") if event.get(key) is not None]
        suffix = f" ({', '.join(detail)})" if detail else ""
        return "service", f"{ts} [service {text(event.get('svc'))}] {text(event.get('state'))}{suffix}"
    if kind == "health":
        output = text(event.get("output")) if event.get("output") else ""
        if output_limit is not None:
            output = output[-output_limit:]
        out = f": {output}" if output else ""
        return "health", (f"{ts} [health {text(event.get('check'))}] {text(event.get('state'))} "
                          f"({exit_text(event.get('exit'), text)}){out}")
    if kind == "init":
        return "init", f"{ts} [init] {text(event.get('msg'))}"
    return None
