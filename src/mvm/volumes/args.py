"""``-v`` values: parsing and the rules every one must follow, before anything is touched.

Forms (the rules are in docs/volumes.md):

    -v HOSTDIR:/guest/path           read-only: an ext4 image built from HOSTDIR at each up
    -v HOSTDIR:/guest/path:secret    read-only, and readable only by root and service users
    -v HOST:/guest/path:SIZE_MB      writable and persistent: created once, never reformatted
    -v HOST:/guest/path:SIZE_MB:secret   the same, readable only by root and service users

A read-only mount whose guest path contains ``secret`` (e.g. ``/run/secrets``) is secret too.
Each error names the offending value and shows the accepted forms.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UsageError
from ..guest import protocol

Mode = Literal["ro", "secret", "rw"]
MIN_SIZE_MB = 8
MAX_SIZE_MB = 1024 * 1024  # 1 TiB
FORMS = ("HOSTDIR:/guest/path (read-only), HOSTDIR:/guest/path:secret, "
         "or HOST:/guest/path:SIZE_MB[:secret] (writable, persistent)")
#: Guest paths that cannot be volumes, with everything below them.
RESERVED_TREES = ("/proc", "/sys", "/dev", *protocol.MVM_TREES)
#: Guest paths that cannot be volumes themselves (the guest needs what is in them).
RESERVED_EXACT = ("/", "/bin", "/boot", "/etc", "/lib", "/lib64", "/sbin", "/usr",
                  # merged /usr (Debian 12 on): /bin is /usr/bin, and so on
                  "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/libexec")


@dataclass(frozen=True)
class VolumeArg:
    """One validated ``-v`` value."""

    text: str
    host: Path
    guest: str
    mode: Mode
    size_mb: int | None = None
    secret_option: bool = False  #: ``:secret`` was given (also with a size: a writable secret volume)

    @property
    def writable(self) -> bool:
        return self.mode == "rw"

    @property
    def secret(self) -> bool:
        return self.mode == "secret" or self.secret_option or is_secret_path(self.guest)


def is_secret_path(guest: str) -> bool:
    """The secrets rule: any guest path that contains ``secret`` (e.g. ``/run/secrets``)."""
    return "secret" in guest.lower()


def _usage(text: str, problem: str, hint: str | None = None) -> UsageError:
    return UsageError(f"-v {text!r}: {problem}", hint=hint or f"use {FORMS}")


def normalize_guest_path(text: str, guest: str) -> str:
    if not guest:
        raise _usage(text, "the guest path is empty")
    if not guest.startswith("/"):
        raise _usage(text, f"guest path {guest!r} is not absolute",
                     hint=f"guest paths start with /, e.g. -v ./config:/{guest.lstrip('./') or 'mnt/config'}")
    parts = [p for p in guest.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _usage(text, f"guest path {guest!r} contains '..'", hint="give the path without '..'")
    path = "/" + "/".join(parts)
    for tree in RESERVED_TREES:
        if path == tree or path.startswith(tree + "/"):
            raise _usage(text, f"guest path {path} is reserved: mounting on {tree} would break the guest",
                         hint="pick a path such as /mnt/NAME or /srv/NAME")
    if path in RESERVED_EXACT:
        what = "the root filesystem" if path == "/" else f"{path}, which the guest needs"
        raise _usage(text, f"guest path {path} is reserved: the volume would hide {what}",
                     hint="pick a path such as /mnt/NAME or /srv/NAME")
    return path


def parse_size(text: str, value: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", value):
        raise _usage(text, f"{value!r} is neither a size in MiB nor 'ro' or 'secret'",
                     hint="e.g. -v ./data:/mnt/data:1024 for a writable 1024 MiB volume")
    size = int(value)
    if size <= 0:
        raise _usage(text, f"size {size} MiB: a volume's size must be a positive number of MiB",
                     hint="e.g. -v ./data:/mnt/data:1024")
    if size < MIN_SIZE_MB:
        raise _usage(text, f"size {size} MiB is too small: a volume needs at least {MIN_SIZE_MB} MiB",
                     hint=f"use :{MIN_SIZE_MB} or more")
    if size > MAX_SIZE_MB:
        raise _usage(text, f"size {size} MiB is too large: at most {MAX_SIZE_MB} MiB (1 TiB)")
    return size


def parse_volume(text: str, cwd: Path | None = None) -> VolumeArg:
    """Parse one ``-v`` value. HOST may contain ':'; the guest path may not."""
    if "\0" in text or "\n" in text:
        raise _usage(text.replace("\0", "\\0"), "contains a NUL byte or a line break")
    parts = text.split(":")
    if len(parts) < 2:
        raise _usage(text, "expected HOST:/guest/path")
    # The guest path is the last absolute part; what follows it are options (ro, secret, a size).
    at = max((i for i in range(1, len(parts)) if parts[i].startswith("/")), default=None)
    if at is None:  # no absolute guest path: take the second-to-last part for the error message
        at = len(parts) - 1 if len(parts) == 2 else len(parts) - 2
    host_text, guest, options = ":".join(parts[:at]), parts[at], parts[at + 1:]
    if not host_text:
        raise _usage(text, "HOST is empty", hint="e.g. -v ./config:/mnt/config")
    path = normalize_guest_path(text, guest)
    if len(options) > 2 or len(set(options)) < len(options):
        raise _usage(text, f"too many options {':'.join(options)!r}: give ro or a size, and/or secret")
    secret = "secret" in options
    rest = [o for o in options if o not in ("secret", "ro")]
    if "ro" in options and rest:
        raise _usage(text, "a volume is either read-only (ro) or writable with a size, not both")
    if len(rest) > 1:  # two sizes, or a misspelt option (`:64:secrets` made a plain writable volume)
        odd = next((o for o in rest if not o.isdigit()), rest[1])
        raise _usage(text, f"{odd!r} is not an option: give ro, or one size in MiB, and/or secret")
    size = parse_size(text, rest[0]) if rest else None
    mode: Mode = "rw" if size is not None else ("secret" if secret else "ro")
    host = ((cwd or Path.cwd()) / Path(host_text).expanduser()).resolve()
    return VolumeArg(text=text, host=host, guest=path, mode=mode, size_mb=size, secret_option=secret)


def parse_volumes(texts: Sequence[str], cwd: Path | None = None) -> list[VolumeArg]:
    """Parse every ``-v`` and refuse combinations: one path twice, nesting, a volume twice."""
    args = [parse_volume(t, cwd) for t in texts]
    for i, a in enumerate(args):
        for b in args[:i]:
            if a.guest == b.guest:
                raise UsageError(f"two volumes on one guest path {a.guest}: -v {b.text!r} and -v {a.text!r}",
                                 hint="give each volume its own guest path")
            inner, outer = (a, b) if a.guest.startswith(b.guest + "/") else (b, a)
            if inner.guest.startswith(outer.guest + "/"):
                raise UsageError(f"volumes cannot be nested: {inner.guest} (-v {inner.text!r}) is inside "
                                 f"{outer.guest} (-v {outer.text!r})",
                                 hint="mount them side by side, e.g. /mnt/a and /mnt/b")
            if a.writable and b.writable and a.host == b.host:
                raise UsageError(f"{a.host} is given twice as a writable volume (-v {b.text!r}, -v {a.text!r})",
                                 hint="a writable volume can be mounted once")
    return args
