"""Running a file system tool on a guest-written image without root's reach.

e2fsck and resize2fs parse what the guest wrote, so when mvm runs as root they run as an
unprivileged user in their own namespaces: a bug in them, triggered by a crafted image,
then reaches neither the host's files nor the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ._proc import require_tool
from .errors import CommandFailed, ToolMissing

log = logging.getLogger(__name__)

#: Who runs the tools that parse guest-written filesystems when mvm runs as root.
CONFINED_USER = "nobody"


@dataclass(frozen=True)
class Confined:
    """How to run one tool on one file it must not reach as root: see :func:`confined`."""

    prefix: list[str]  #: argv before the tool's (empty when mvm does not run as root)
    cwd: Path | None  #: where the tool runs: the file's name is relative to it
    name: str  #: the file, as the tool must name it

    def argv(self, tool: str, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        """The argv of ``tool`` run confined (``args`` use :attr:`name` for the file)."""
        if not self.prefix:
            return [tool, *args]
        return [*self.prefix, require_tool(tool), *args]


@contextlib.contextmanager
def confined(path: Path, user: str = CONFINED_USER) -> Iterator[Confined]:
    """Lend ``path`` (read-write) to an unprivileged ``user`` for the length of the block.

    Run as another user, a tool can open a root-owned file only if that user may, and the
    file's directories are private (``0700``). So, while the block runs, the file is owned
    by ``user`` (its owner and mode are restored after, whatever the tool did to them) and
    hard-linked into a fresh directory of that user's, the tool's working directory: the
    tool names it relatively and needs no other path. The tool runs under ``unshare`` (new
    PID, network and IPC namespaces, so nothing it starts outlives it or reaches the network)
    and ``setpriv`` (the user's uid and gid, no groups, no capabilities, ``no_new_privs``).

    When mvm does not run as root, the tool runs as mvm's user, as everything else does.
    """
    if os.geteuid() != 0:
        yield Confined([], None, str(path))
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ToolMissing(f"there is no user {user!r} to run file system tools as",
                          hint=f"create it (useradd --system {user})") from None
    real = path.resolve()
    try:
        st = os.stat(real)
        staging = Path(tempfile.mkdtemp(prefix=".mvm-confined-", dir=real.parent))
    except OSError as exc:
        raise CommandFailed(f"cannot lend {path} to the unprivileged user {user!r}: {exc.strerror}") from None
    try:
        try:
            os.chown(staging, entry.pw_uid, entry.pw_gid)
            os.link(real, staging / real.name)
            os.chown(real, entry.pw_uid, entry.pw_gid)
        except OSError as exc:
            raise CommandFailed(f"cannot lend {path} to the unprivileged user {user!r}: {exc.strerror}") from None
        prefix = [require_tool("unshare"), "--pid", "--fork", "--kill-child", "--net", "--ipc", "--",
                  require_tool("setpriv"), f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
                  "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
        yield Confined(prefix, staging, real.name)
    finally:  # each on its own: a chown refused must not leave the mode as lent
        _give_back(os.chown, real, st.st_uid, st.st_gid)
        _give_back(os.chmod, real, stat.S_IMODE(st.st_mode))
        shutil.rmtree(staging, ignore_errors=True)


def _give_back(call: Callable[..., None], path: Path, *args: int) -> None:
    """Undo what lending ``path`` changed; a failure is logged, never raised over the error
    that ended the lending."""
    try:
        call(path, *args)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not give %s back its owner or mode: %s", path, exc)
