"""Thin wrappers over the Linux calls PID 1 needs, without forking helpers.

Stdlib only. Mounting, hostname, power-off and network set-up go through libc (ctypes) and
ioctls, because every fork costs tens of milliseconds under software emulation.
There is no udev in the guest: disks are found by ``/sys/block/vd*/serial`` and
virtio-serial ports by ``/sys/class/virtio-ports/*/name``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MNT_DETACH = 2
RB_POWER_OFF = 0x4321FEDC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.reboot.argtypes = [ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None),
        f"mount {source} on {target}",
    )


def umount(target: str, lazy: bool = False) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH if lazy else 0), f"umount {target}")


def power_off() -> None:
    os.sync()
    _libc.reboot(RB_POWER_OFF)


def mount_early() -> None:
    """The API filesystems. /dev is already devtmpfs, moved over by the initrd."""
    table = [
        ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
        ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666,gid=5"),
        ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ]
    for source, target, fstype, flags, data in table:
        try:
            mount(source, target, fstype, flags, data)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
    protect_links()
    for link, dest in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                       ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"),
                       ("/dev/ptmx", "pts/ptmx")):
        if not os.path.lexists(link):
            try:
                os.symlink(dest, link)
            except OSError:
                pass


def protect_links() -> None:
    """The kernel's link protections, whatever the guest kernel's defaults (Debian's turn
    them on, a plain kernel's are off): no hard link to another user's file, no following
    another user's symlink in a sticky directory such as /tmp. The preStart hand-over relies
    on the first (a root file linked into /tmp by a service user would be given away)."""
    for name in ("protected_hardlinks", "protected_symlinks"):
        try:
            with open(f"/proc/sys/fs/{name}", "w") as f:
                f.write("1")
        except OSError:
            pass


def valid_hostname(name: str) -> bool:
    """RFC 1123 (as the host checks a spec's): a name from the kernel command line (a
    KubeVirt export's ``mvm.hostname``) goes into /etc/hosts too, where a space or a line
    break would add hosts."""
    labels = name.split(".")
    return len(name) <= 253 and all(
        0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


def set_hostname(name: str) -> None:
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)
    try:
        overwrite("/etc/hostname", f"{name}\n".encode())
        overwrite("/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost\n".encode())
    except OSError:
        pass  # a read-only root is fine: the kernel hostname is what matters


def overwrite(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` over the file's bytes in place, then cut it to length if that changed.

    A restored clone rewrites its identity files before its forwards open, and every kernel
    path it runs is translated anew under TCG: a write into a page the template already
    cached costs it a few ms, where creating a file and renaming it over the old one (inode,
    directory and journal work) cost ~55 ms on an emulated arm64 guest. At equal lengths
    (``/etc/machine-id``) a reader sees the old bytes or the new ones; a shorter text is cut
    to length right after.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        os.pwrite(fd, data, 0)
        st = os.fstat(fd)
        if st.st_size != len(data):
            os.ftruncate(fd, len(data))
        if st.st_mode & 0o7777 != mode:  # the build host's copy (mmdebstrap's) may have had any mode
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


# --- devices ---------------------------------------------------------------------------


def disks_by_serial() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                serial = f.read().strip()
        except OSError:
            continue
        if serial:
            found[serial] = f"/dev/{name}"
    return found


def wait_for_disks(serials: list[str], timeout: float = 5.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = disks_by_serial()
        if all(s in found for s in serials) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def virtio_ports() -> dict[str, str]:
    """Port name -> /dev node, from sysfs (there is no /dev/virtio-ports without udev)."""
    ports: dict[str, str] = {}
    base = "/sys/class/virtio-ports"
    try:
        entries = os.listdir(base)
    except OSError:
        return ports
    for dev in entries:
        try:
            with open(f"{base}/{dev}/name") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name:
            ports[name] = f"/dev/{dev}"
    return ports
