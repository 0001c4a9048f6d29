"""A user of its own for each VM's QEMU, when mvm runs as root.

Why one uid per VM, rather than one shared uid or user namespaces: with a uid each, the
kernel's ordinary checks keep one VM's QEMU away from every other: it cannot signal or
trace another QEMU, and it can open none of mvm's files by path (the state dir is root's,
mode 0700). QEMU needs no path at all: mvm opens every disk, the kernel, the RAM file and
the sockets and hands them over as descriptors (:mod:`mvm.backends.qemu_handoff`), which is
what Firecracker's jailer does too. QEMU starts as that user, so its seccomp sandbox keeps
``elevateprivileges=deny`` (``-runas`` would need to change user after start-up). A shared
uid would let one compromised QEMU signal and ptrace all the others; a user namespace would
add a mapping and gain nothing more here.

The range: ``MVM_UID_BASE`` (default 1,900,000,000: above systemd's container range, which
ends at 1,879,048,191, and below 2^31) plus 1 to 65535, each user with a group of the same
number. The base itself is a group all of them are in: the group of template RAM files,
which a clone's QEMU must open read-write although it maps them copy-on-write (QEMU 7.2
has no ``rom=off``; see SECURITY.md). Membership in /dev/kvm's group comes with it, where
that group may use it (never group 0: that would open root's group-readable files).

A lease is an ``flock`` on ``/run/mvm/users/<uid>.lock``: one place for the whole host,
since VMs of every ``MVM_HOME`` draw from the same range. QEMU inherits the locked
descriptor (``hold_fds``), so a uid is free again exactly when the QEMU using it ends,
crash included: there is no record to go stale. When mvm is not root, QEMU runs as mvm's
own user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .._locks import try_flock
from ..backends.base import RunAs
from ..errors import VMError

DEFAULT_BASE = 1_900_000_000
SLOTS = 65535
LOCKS = Path("/run/mvm/users")


def base() -> int:
    return int(os.environ.get("MVM_UID_BASE", DEFAULT_BASE))


def confining() -> bool:
    """Whether QEMU gets users of its own (only root can start a process as another user)."""
    return os.geteuid() == 0


def shared_group() -> int | None:
    """The group every VM's QEMU is in (template RAM files belong to it); None when not root."""
    return base() if confining() else None


def kvm_group() -> int | None:
    """The group that may use /dev/kvm (``kvm`` on most distributions), if one may."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    return st.st_gid if st.st_gid != 0 and st.st_mode & 0o060 == 0o060 else None


@dataclass
class Lease:
    """A uid held for one QEMU: pass ``fd`` to it (``hold_fds``), then :meth:`release` ours."""

    run_as: RunAs
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lease(vm: str) -> Lease | None:
    """A free uid for VM ``vm``'s QEMU, or None when mvm is not root."""
    if not confining():
        return None
    first = base()
    LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
    for slot in range(1, SLOTS + 1):
        uid = first + slot
        fd = try_flock(LOCKS / f"{uid}.lock")
        if fd is None:
            continue
        kvm = kvm_group()
        return Lease(RunAs(uid=uid, gid=uid, groups=(first,) if kvm is None else (first, kvm)), fd)
    raise VMError(vm, f"all {SLOTS} QEMU users ({first + 1}-{first + SLOTS}) are in use",
                  hint="stop a VM, or set MVM_UID_BASE to a free range")
