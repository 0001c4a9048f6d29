"""Making a restored guest its own machine. Stdlib only.

A guest restored from a template starts with the template's kernel RNG state, machine-id,
hostname and clock. The host sends fresh values (the clock through ``ping``, the rest
through ``configure`` or ``refresh``) and this module applies them:

- RNG: the host's bytes are mixed in *and credited* (``RNDADDENTROPY``), then the CRNG is
  reseeded at once (``RNDRESEEDCRNG``), so two clones of one template read different bytes
  from ``/dev/urandom`` from then on.
- ``/etc/machine-id``: a new random id (the root filesystem is the clone's own overlay).
- the hostname.
"""

from __future__ import annotations

import base64
import fcntl
import os
import struct

from . import system

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed(seed_b64: str) -> None:
    seed = base64.b64decode(seed_b64)
    if not seed:
        return
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def new_machine_id() -> None:
    system.overwrite("/etc/machine-id", f"{os.urandom(16).hex()}\n".encode(), 0o444)
