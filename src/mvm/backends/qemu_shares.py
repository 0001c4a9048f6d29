"""Live host directories for a guest (``mvmctl dev``'s project): one virtiofsd per share.

virtiofsd creates what the guest asks for under the guest's ids, so who it runs as decides
what a guest's root can make on the host: a user's directory is served as that user (root
only in a user namespace of its own), a root-owned one as root, and only where no one else
could swap it for a directory of theirs before virtiofsd opens it. mvm binds each share's
socket in the VM's own directory (root's) and lends it to virtiofsd (``--fd``).
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

from .. import _unixsock
from .._proc import RunAs, Runner, require_tool, signals_deferred, tail_file
from ..errors import BootError, UsageError
from .base import LaunchSpec
from .qemu_argv import share_socket, virtiofsd_argv

#: How long a virtiofsd may take to say it serves its socket.
START_TIMEOUT = 10.0


def find_virtiofsd() -> str:
    """virtiofsd is not on PATH on Debian (qemu-system-common puts it in /usr/lib/qemu)."""
    for candidate in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return require_tool("virtiofsd")


#: The group of a share's owner who has no account (Debian's nogroup).
NOGROUP = 65534
#: What Debian 12's virtiofsd logs once it serves its socket.
VIRTIOFSD_READY = "Waiting for vhost-user socket connection"


def _has_acl(path: Path) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(path)
    except OSError:  # a file system without extended attributes has no ACLs either
        return False


def _share_source(path: Path) -> tuple[Path, RunAs | None]:
    """The directory a share's virtiofsd serves (links resolved), and whom it runs as: the
    directory's owner with the owner's own groups, when mvm is root and the owner is not
    (see :func:`mvm.backends.qemu_argv.virtiofsd_argv`).

    virtiofsd opens the path after this looks at it. For a user's directory, whatever is
    there by then is served as that user: nothing gained by a swap. A root-owned one is
    served as root, so no one else may be able to swap it in the meantime (a user who owns
    a directory above it could put their own project there, to be served as root)."""
    real = Path(os.path.realpath(path))
    st = os.stat(real)
    if os.geteuid() != 0:
        return real, None
    if st.st_uid != 0:
        try:
            entry = pwd.getpwuid(st.st_uid)
        except KeyError:  # an owner with no account: no group of theirs either
            return real, RunAs(st.st_uid, NOGROUP)
        return real, RunAs(st.st_uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    for above in real.parents:
        a = os.stat(above)
        # in a sticky directory no one renames another's entry; elsewhere group write (group
        # 0 has members too) and an ACL (its mask is what the group bits show) let others
        writable = not a.st_mode & stat.S_ISVTX and (a.st_mode & 0o022 or _has_acl(above))
        if a.st_uid != 0 or writable:
            raise UsageError(f"cannot share {real}: it is root's, but {above} can be changed by others, who "
                             "could put a directory of theirs in its place and have root serve it",
                             hint="move the project under a directory only root can change, or give it to a user")
    return real, None


def start_shares(spec: LaunchSpec, runner: Runner, helpers: list[subprocess.Popen[bytes]]) -> None:
    """One virtiofsd per share, added to ``helpers`` as it starts (the caller's undo
    stops them). Each serves one QEMU connection and exits when QEMU does."""
    if not spec.shares:
        return
    for share in spec.shares:
        if "," in str(share.path):
            raise UsageError(f"cannot share {share.path}: virtiofsd options cannot hold a comma",
                             hint="move or link the directory to a path without commas")
    virtiofsd = find_virtiofsd()
    for i, share in enumerate(spec.shares):
        log_path = spec.files.root / f"virtiofsd{i}.log"
        source, owner = _share_source(share.path)
        # mvm binds the socket in the VM dir (root's) and lends it: the owner's virtiofsd
        # needs no directory of its own there, where it could swap the socket for a link
        with _unixsock.listen(spec.files.root / share_socket(i)) as listener:  # a deep VM dir's too
            fd = listener.fileno()
            with open(log_path, "ab") as log_file, signals_deferred():
                helper = runner.spawn(virtiofsd_argv(virtiofsd, source, fd, as_owner=owner is not None),
                                      stdout=log_file, cwd=spec.files.root, pass_fds=[fd], user=owner)
                helpers.append(helper)
        deadline = time.monotonic() + START_TIMEOUT
        while VIRTIOFSD_READY not in log_path.read_text(errors="replace"):
            if helper.poll() is not None:
                raise BootError(spec.name, f"virtiofsd could not share {share.path}",
                                hint="virtiofsd needs mvm to run as root, and the directory's owner to "
                                "reach it (every directory above it searchable by them)",
                                output=tail_file(log_path))
            if time.monotonic() > deadline:
                break  # a virtiofsd that says nothing (another build): QEMU's connection tells
            time.sleep(0.01)

