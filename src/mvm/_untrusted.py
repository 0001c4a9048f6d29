"""Values that come from a guest, made safe to show and to use on the host.

The host treats everything a guest sends (agent replies, events, file names in its volumes)
as hostile input. Text from it may hold terminal escape sequences (which would let a guest
retitle the user's terminal, fake output, or write to the clipboard) and may be of any size
or type. These helpers bound and neutralise it; the CLI and the logs use them before
anything guest-written reaches a terminal.
"""

from __future__ import annotations

import re

#: C0 and C1 control characters (but tab and, where asked, newline), DEL, and the Unicode
#: bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_NL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
DEFAULT_LIMIT = 4000


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object, limit: int = DEFAULT_LIMIT, *, newlines: bool = False) -> str:
    """``value`` as text a terminal shows as is: control characters and escape sequences
    become visible ``\\xNN`` escapes, and the text is cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit} more characters)"
    return (_CONTROL_KEEP_NL if newlines else _CONTROL).sub(_escape, text)


def as_int(value: object, default: int) -> int:
    """An integer the guest sent, or ``default`` when it sent anything else (bools too)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def as_float(value: object) -> float | None:
    """A finite number the guest sent, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if number == number and abs(number) != float("inf") else None
