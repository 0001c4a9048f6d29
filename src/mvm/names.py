"""Name rules, kept apart from the pydantic models so the fast CLI paths need no pydantic."""

from __future__ import annotations

import platform
import re
from typing import Literal

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: The smallest guest memory that boots (MiB): below it the kernel and the guest's Python
#: run out of memory at boot (measured: docs/performance.md).
MIN_MEMORY_MIB = 128

#: Seconds a wait for health waits unless told otherwise: ``up --wait``, ``restart --wait``,
#: ``template create``, the pytest fixtures.
HEALTH_TIMEOUT = 120.0

#: Guest CPU architectures, in the kernel's (and Nix's) spelling.
Arch = Literal["x86_64", "aarch64"]
ARCHES: tuple[Arch, ...] = ("x86_64", "aarch64")
#: Other spellings of them (Debian's, Go's, Apple's): what ``uname -m`` may say, what a user may type.
ARCH_ALIASES: dict[str, Arch] = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}

#: uid (and gid of group ``mvm``) of the default service user; further service users follow it.
DEFAULT_UID = 1000


def check_vm_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid VM name: use 1-63 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return name


#: A hostname as RFC 1123 has it: dot-separated labels of letters, digits and '-'.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def check_hostname(name: str | None) -> str | None:
    """A spec's ``hostname``: it goes into the guest's /etc/hostname and /etc/hosts, where a
    space or a line break would add names or hosts."""
    if name is not None and (len(name) > 253 or not HOSTNAME_RE.fullmatch(name)):
        raise ValueError(f"{name!r} is not a valid hostname: use labels of a-z, A-Z, 0-9 and '-' "
                         "(1-63 characters, not starting or ending with '-'), separated by dots")
    return name


def check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not ENV_NAME_RE.fullmatch(key):
            raise ValueError(f"{key!r} is not a valid environment variable name")
        if "\0" in value:
            raise ValueError(f"the value of {key} contains a NUL byte")
    return env


def host_arch() -> str:
    """This machine's CPU architecture in the kernel's spelling (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return ARCH_ALIASES.get(machine, machine)
