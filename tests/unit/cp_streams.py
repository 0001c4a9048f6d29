"""Tar streams as `mvmctl cp` sends them into the guest (tests of mvm.guest.copy)."""

import io
import tarfile

from mvm.guest.copy import TOP


def one_file(payload: bytes) -> bytes:
    """A stream of one regular file, named as the guest's copy helper expects its top entry."""
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(TOP)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return stream.getvalue()
