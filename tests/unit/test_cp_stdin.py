"""`cp - VM:PATH` takes a tar archive on stdin; anything else is said so before the guest sees it."""

from __future__ import annotations

import io
import tarfile

import pytest

from mvm._api.copy import tar_stream
from mvm.errors import UsageError


def test_a_tar_on_stdin_passes_whole() -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = b"x" * 100_000
        info = tarfile.TarInfo("big")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = raw.getvalue()

    class Trickle(io.RawIOBase):  # a pipe: short reads
        def __init__(self) -> None:
            self.left = archive

        def readable(self) -> bool:
            return True

        def readinto(self, buffer):  # type: ignore[no-untyped-def]
            n = min(7, len(buffer))
            data, self.left = self.left[:n], self.left[n:]
            buffer[:len(data)] = data
            return len(data)

    assert tar_stream(Trickle()).read() == archive  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_tar_and_an_empty_one_pass(mode: str) -> None:
    """The guest's tar reads compressed archives (`tar czf - site | mvmctl cp - web:/srv`)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode=mode) as tar:  # type: ignore[call-overload]
        tar.addfile(tarfile.TarInfo("empty"))
    assert tar_stream(io.BytesIO(raw.getvalue())).read() == raw.getvalue()
    assert tar_stream(io.BytesIO(b"\0" * 1024)).read() == b"\0" * 1024  # no members: still a tar


@pytest.mark.parametrize(("stdin", "said"), [(b"abc\n", "not a tar archive"), (b"", "empty")])
def test_stdin_that_is_not_a_tar_is_said_so(stdin: bytes, said: str) -> None:
    """`echo abc | mvmctl cp - web:/tmp` failed in the guest with only "truncated header"."""
    with pytest.raises(UsageError, match=f"reads a tar archive on stdin .* and stdin is {said}") as bad:
        tar_stream(io.BytesIO(stdin))
    assert "tar -C ./site -cf - . | mvmctl cp - web:/srv/site" in (bad.value.hint or "")
