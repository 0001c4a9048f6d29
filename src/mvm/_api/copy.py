"""``cp``: files and directories between the host and a running VM, ``docker cp``'s rules.

One side is ``NAME:/path`` (a VM in the registry), the other a host path. The data travel
as a tar stream over the agent channel (the guest half is :mod:`mvm.guest.copy`, which
also holds the rules for where things land). Copied in, files belong to root unless
``archive`` keeps the host's owners; copied out, they belong to the user running mvm.

What a guest sends is untrusted: the host unpacks it entry by entry relative to a
descriptor of the destination, never through a symlink (:mod:`mvm._api.guest_tar`), so no
entry lands outside the destination, no link points out of it, and no device node, setuid
bit or foreign owner reaches the host. tarfile reads a pax or GNU long-name header into
memory whole, so those are capped (:class:`BoundedTarInfo`).
"""

from __future__ import annotations

import functools
import io
import os
import re
import shlex
import sys
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._untrusted import printable
from ..errors import MvmError, UsageError, VMError, VMNotFound
from ..guest import copy as protocol
from ..names import NAME_RE
from ..paths import Layout
from ..runtime import agent
from ..runtime.registry import Registry
from . import guest_tar
from .vm import VM

#: How much of the guest side's error output is kept for the error message.
STDERR_LIMIT = 64 * 1024
#: ``NAME:path`` (NAME a VM's name, by its rule): a path in a VM, if NAME is one
VM_PATH = re.compile(rf"({NAME_RE.pattern.removeprefix('^').removesuffix('$')}):(.*)", re.DOTALL)


#: The most read after the archive's end (a record is 10 KiB).
DRAIN_LIMIT = 1 << 20
#: The largest pax or GNU long-name header accepted from a guest (real ones are a few KB).
EXTENDED_HEADER_LIMIT = 1 << 20


class BoundedTarInfo(tarfile.TarInfo):
    """A tar member whose extended header (read into memory whole by tarfile) has a size cap,
    and never a sparse one: tarfile reads a sparse map's blocks into a list for as long as
    the stream goes on (a guest's endless stream grew the host's `cp` by GiBs)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in EXTENDED_TYPES and self.size > EXTENDED_HEADER_LIMIT:
            raise tarfile.ReadError(f"extended header of {self.size} bytes (more than {EXTENDED_HEADER_LIMIT})")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.ReadError("a sparse file (no guest's own tar makes one for cp)")
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: object, tarfile_: object) -> None:
        raise tarfile.ReadError("a sparse file (no guest's own tar makes one for cp)")


EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                  tarfile.GNUTYPE_LONGLINK)


@dataclass(frozen=True)
class Endpoint:
    path: str
    vm: str | None = None  #: None: the host


def parse_endpoint(text: str, layout: Layout) -> Endpoint:
    """``NAME:/path`` when NAME is a VM (a host path may contain ``:`` too), else a host path."""
    match = VM_PATH.fullmatch(text)
    if match and Registry(layout).files(match.group(1)).root.is_dir():
        if not match.group(2).startswith("/"):
            raise UsageError(f"{text!r}: the path in the VM must be absolute",
                             hint=f"e.g. {match.group(1)}:/tmp/x")
        return Endpoint(match.group(2), match.group(1))
    return Endpoint(text)


def cp(src: str, dest: str, *, archive: bool = False, follow_link: bool = False,
       layout: Layout | None = None) -> list[str]:
    """Copy ``src`` to ``dest``; exactly one of them is ``NAME:/path``. A ``dest`` of ``-``
    writes a tar archive of ``src`` to stdout instead, as ``docker cp`` does (its top entry
    named as ``src``, the guest's owners kept); ``./-`` is a file named ``-``. A ``src`` of
    ``-`` extracts the tar archive on stdin into the directory ``dest``. ``follow_link``:
    a ``src`` that is a symbolic link is followed (``cp -L``), else copied as the link.
    Returns what a copy out of the VM left out, and why (``"path: reason"``): links that lead
    out of the destination and device nodes, which the host never takes from a guest."""
    layout = layout or Layout.default()
    a, b = parse_endpoint(src, layout), parse_endpoint(dest, layout)
    if a.vm is None and b.vm is None:
        for text in (src, dest):  # NAME:path of a VM that is not there (and no such host path)
            match = VM_PATH.fullmatch(text)
            if match and not os.path.lexists(text):
                raise VMNotFound(match.group(1), f"no VM named {match.group(1)!r} (in {text!r})",
                                 hint="list VMs with `mvmctl ls`")
    if (a.vm is None) == (b.vm is None):
        raise UsageError("cp copies between the host and a VM: give NAME:/path on one side",
                         hint="e.g. mvmctl cp ./site hello:/srv/site, or mvmctl cp hello:/var/log/app.log .")
    if b.vm is not None and src == "-":  # a tar archive on stdin, as `docker cp -` takes one
        if sys.stdin.isatty():
            raise UsageError("`cp -` reads a tar archive on stdin (as docker cp does), and stdin is a terminal",
                             hint=f"e.g. tar -C ./site -cf - . | mvmctl cp - {b.vm}:{b.path}")
        vm = VM(b.vm, layout)
        vm.require_running()  # before reading stdin
        _run(vm, ["untar", b.path, "1" if archive else "0"], tar_stream(sys.stdin.buffer), None)
        return []
    if b.vm is not None:
        _to_guest(Path(a.path), src.endswith("/."), VM(b.vm, layout), b.path, archive, follow_link)
        return []
    assert a.vm is not None
    if dest == "-":
        sys.stdout.flush()
        _to_stream(VM(a.vm, layout), a.path, sys.stdout.buffer, follow_link)
        return []
    return _to_host(VM(a.vm, layout), a.path, dest, follow_link)


#: How a gzip, bzip2 or xz stream begins (`tar czf - dir | mvmctl cp - web:/srv`, as docker cp takes).
COMPRESSED_TAR_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def tar_stream(stream: IO[bytes]) -> IO[bytes]:
    """``stream`` if it begins with a tar header (its first 512 bytes, read and put back), else
    a clear error: the guest's tar said only "truncated header" of `echo abc | cp - web:/tmp`."""
    first = b""
    while len(first) < tarfile.BLOCKSIZE and (more := stream.read(tarfile.BLOCKSIZE - len(first))):
        first += more
    header = first[:tarfile.BLOCKSIZE]
    try:
        # a compressed one the guest's tar reads as well; a block of zeros ends an empty one
        if not first.startswith(COMPRESSED_TAR_MAGIC) and header != tarfile.NUL * tarfile.BLOCKSIZE:
            tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        what = "empty" if not first else "not a tar archive"
        raise UsageError(f"`cp -` reads a tar archive on stdin (as docker cp does), and stdin is {what}",
                         hint="e.g. tar -C ./site -cf - . | mvmctl cp - web:/srv/site; to copy files, name "
                         "them: mvmctl cp ./file web:/path") from None
    return io.BufferedReader(_Prefixed(first, stream))


class _Prefixed(io.RawIOBase):
    """``head``, then the rest of ``tail``."""

    def __init__(self, head: bytes, tail: IO[bytes]) -> None:
        self._head, self._tail = head, tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._head[:len(buffer)] if self._head else self._tail.read(len(buffer))
        self._head = self._head[len(data):] if self._head else b""
        buffer[:len(data)] = data
        return len(data)


def _run(vm: VM, args: list[str], feed: IO[bytes] | None, sink: IO[bytes] | None) -> None:
    """Run the guest's copy with ``feed`` as its input and ``sink`` taking its output."""
    vm.require_running()
    errors: list[bytes] = []
    with agent.AgentSession(vm.files, vm.name) as session:
        session.start("copy", args=args)
        if feed is None:
            session.send_input("eof")
        else:
            while chunk := feed.read(65536):
                session.send_stdin(chunk)
            session.send_input("eof")
        final = agent.Final(ok=False, exit=1, error="no reply")
        for msg in session.events():
            if isinstance(msg, agent.Final):
                final = msg
            elif msg.stream == "stdout" and sink is not None:
                sink.write(msg.data)
            elif msg.stream == "stderr" and sum(map(len, errors)) < STDERR_LIMIT:
                errors.append(msg.data)
    if final.exit != 0:
        text = printable(b"".join(errors)[:STDERR_LIMIT].decode(errors="replace").strip(), newlines=True)
        message = (text or final.error or "failed").removeprefix("mvm cp: ")
        missing = re.match(r"(/.*?)/? does not exist\b", message) if args[0] == "in" else None  # DEST's dir
        raise VMError(vm.name, message, hint=f"make it first: mvmctl exec {vm.name} -- mkdir -p "
                      f"{shlex.quote(missing.group(1))}" if missing else None)


def _to_guest(src: Path, contents_only: bool, vm: VM, dest: str, archive: bool, follow: bool = False) -> None:
    """``follow``: a link ``src`` is read through (it keeps its own name in the VM, as ``cp -L``)."""
    if not src.exists() and not src.is_symlink():
        raise UsageError(f"{src} does not exist")
    read = src.resolve() if follow else src
    if not read.exists() and not read.is_symlink():
        raise UsageError(f"{src} is a link to {read}, which does not exist")
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def pack() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out, tarfile.open(fileobj=out, mode="w|",
                                                                 format=tarfile.PAX_FORMAT) as tar:
                tar.add(read, arcname=protocol.TOP)
        except BaseException as exc:  # reported after the guest side ends
            failure.append(exc)

    packer = threading.Thread(target=pack, daemon=True)
    packer.start()
    kind = "dir" if read.is_dir() and not read.is_symlink() else "file"
    with os.fdopen(read_fd, "rb") as feed:
        _run(vm, ["in", dest, kind, src.resolve().name if contents_only else src.name,
                  "1" if contents_only else "0", "1" if archive else "0"], feed, None)
    packer.join()
    if failure:
        if not isinstance(failure[0], (OSError, tarfile.TarError)):
            raise failure[0]  # a bug, or Ctrl-C: not a file mvm could not read
        raise UsageError(f"could not read {src}: {failure[0]}") from failure[0]


def _host_destination(dest: str) -> str:
    """DEST as the guest's rules (``protocol.destination``) expect it: absolute (a bare
    ``app.log`` unpacked into ``/``), its trailing ``/`` kept, and a link the user named
    followed, as ``cp`` follows one."""
    path = os.path.abspath(dest)
    if os.path.islink(path):
        path = os.path.realpath(path)
    return path + "/" if dest.endswith("/") and path != "/" else path


def _top_name(src: str) -> str:
    return os.path.basename(src.rstrip("/.")) or "root"


def _unpack(src: str, dest: str, skipped: list[str], tar: tarfile.TarFile) -> None:
    """The guest's archive of ``src`` into the host path ``dest`` (docker cp's rules); what
    is left out goes to ``skipped``."""
    root_fd: int | None = None
    try:
        new_top = None
        for member in tar:
            if root_fd is None:
                where, new_top = protocol.destination(_host_destination(dest), member.isdir(), _top_name(src),
                                                      src.endswith("/."))
                root_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            renamed = protocol.rename(member, new_top, archive=False)
            if renamed is not None:  # links stay inside the new top entry, when there is one
                why = guest_tar.extract(root_fd, tar, renamed, floor=0 if new_top is None else 1)
                if why is not None:
                    skipped.append(why)
    finally:
        if root_fd is not None:
            os.close(root_fd)


def _restream(src: str, out: IO[bytes], tar: tarfile.TarFile) -> None:
    """The guest's archive of ``src`` on ``out``, entry by entry: the top entry named as
    ``src`` (the guest's stream names it by a placeholder), nothing unpacked on the host."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar_out:
        for member in tar:
            renamed = protocol.rename(member, _top_name(src), archive=True)
            assert renamed is not None  # a new top name keeps every entry
            tar_out.addfile(renamed, tar.extractfile(member) if member.isreg() else None)
    out.flush()


def _to_host(vm: VM, src: str, dest: str, follow: bool = False) -> list[str]:
    skipped: list[str] = []
    _from_guest(vm, src, dest, functools.partial(_unpack, src, dest, skipped), follow)
    return skipped


def _to_stream(vm: VM, src: str, out: IO[bytes], follow: bool = False) -> None:
    _from_guest(vm, src, "-", functools.partial(_restream, src, out), follow)


def _from_guest(vm: VM, src: str, dest: str, consume: Callable[[tarfile.TarFile], None], follow: bool) -> None:
    """Run the guest's copy of ``src`` out, its tar stream read by ``consume`` (in a thread)."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def unpack() -> None:
        try:
            with os.fdopen(read_fd, "rb") as feed, tarfile.open(fileobj=feed, mode="r|",
                                                                tarinfo=BoundedTarInfo) as tar:
                consume(tar)
                # the rest of the guest's last record (tar pads to 10 KiB), read so that a closed
                # pipe does not fail a finished copy; more than a record's worth is not a tar's
                if len(feed.read(DRAIN_LIMIT)) >= DRAIN_LIMIT:
                    raise UsageError("the guest sent more after the end of the archive", hint="copy again")
        except BaseException as exc:
            failure.append(exc)

    unpacker = threading.Thread(target=unpack, daemon=True)
    unpacker.start()
    broken: BrokenPipeError | None = None
    try:
        with os.fdopen(write_fd, "wb") as sink:
            _run(vm, ["out", src, "1" if follow else "0"], None, sink)
    except BrokenPipeError as exc:  # the unpacker stopped reading: its reason, below, is the error
        broken = exc
    finally:
        unpacker.join()
    if broken is not None and not failure:
        raise broken
    if failure:
        first = failure[0]
        if isinstance(first, (MvmError, BrokenPipeError)):  # the latter: `cp NAME:/x - | head`
            raise first
        raise UsageError(f"could not copy {vm.name}:{src} to {dest}: {first}") from first
