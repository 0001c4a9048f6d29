"""The per-boot runtime config, handed to the guest as a small raw disk.

Things that change per ``up`` and not per image (``-e`` overrides, volume mounts, the VM
name) reach the guest init before any service starts, without a network round trip and
without the kernel command line's 2 KiB limit. The disk is JSON padded with NULs, found in
the guest by its serial (``mvm-config``). A raw disk works on every backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import UsageError
from ..guest import protocol

SCHEMA = 1


class BootVolume(BaseModel):
    """A volume the guest mounts: the disk with ``serial`` on ``target``."""

    serial: str
    target: str
    readonly: bool
    secret: bool = False
    fresh: bool = False  #: made by this ``up``: the guest hands its files to the service user


class BootConfig(BaseModel):
    """What one boot is told, on the config disk or in a clone's ``configure`` (the guest's
    init reads these keys: guest/init.py)."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA
    vm: str
    env: dict[str, str] = {}
    volumes: list[BootVolume] = []


def write_config_disk(path: Path, config: BootConfig) -> None:
    data = config.model_dump_json().encode()
    if len(data) >= protocol.CONFIG_DISK_BYTES:
        raise UsageError(
            f"the runtime config is {len(data)} bytes; at most {protocol.CONFIG_DISK_BYTES - 1} fit",
            hint="pass large values through a read-only volume (-v DIR:/path) instead of -e",
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data.ljust(protocol.CONFIG_DISK_BYTES, b"\0"))
    except OSError as exc:  # a full disk: say which file
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def read_config_disk(path: Path) -> BootConfig | None:
    """What :func:`write_config_disk` wrote (None if the disk is missing or unreadable)."""
    try:
        return BootConfig.model_validate_json(path.read_bytes()[: protocol.CONFIG_DISK_BYTES].split(b"\0", 1)[0])
    except (OSError, ValidationError):
        return None
