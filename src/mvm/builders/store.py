"""The content-addressed image store.

An image is a directory ``images/<key>/`` holding ``vmlinux``, ``initrd``, ``rootfs.ext4``
and ``manifest.json``. The key is a digest of everything that went into the image, so an
unchanged spec finds its image without building. Images are published atomically: built in
a temporary sibling directory and renamed into place, under a per-key lock, so a crash or
Ctrl-C never leaves a half-written entry that looks complete. Booting never modifies an
image (the root drive is a per-boot snapshot).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .._atomic import remove_tree, write_json_atomic
from .._locks import held, locked
from ..errors import StateError
from ..spec import GuestSpec

#: 2: ``guest`` is the validated guest model (1 had a free-form dict); ``arch`` added.
MANIFEST_SCHEMA = 2
MANIFEST = "manifest.json"
#: where VMs mark the images they use (ImageStore.add_user), and the markers' format
USERS = ".users"
USERS_SCHEMA = 1


#: What a build says while another process builds the same image (it then takes that one's).
WAITING_FOR_ANOTHER_BUILD = "waiting for another build of the same image (another mvmctl)"

class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = MANIFEST_SCHEMA
    key: str
    name: str
    frontend: Literal["toml", "nix"]
    source: dict[str, Any]
    kernel: str = "vmlinux"
    kernel_version: str = ""
    initrd: str | None = "initrd"
    rootfs: str = "rootfs.ext4"
    sizes: dict[str, int] = {}
    transports: list[str] = ["virtio-serial"]
    arch: Literal["x86_64", "aarch64"] = "x86_64"
    guest: GuestSpec
    created_at: float = 0.0
    build_secs: float = 0.0


@dataclass(frozen=True)
class Image:
    path: Path
    manifest: Manifest

    @property
    def kernel(self) -> Path:
        return self.path / self.manifest.kernel

    @property
    def initrd(self) -> Path | None:
        return self.path / self.manifest.initrd if self.manifest.initrd else None

    @property
    def rootfs(self) -> Path:
        return self.path / self.manifest.rootfs

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def name(self) -> str:
        return self.manifest.name


def read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST
    try:
        data = json.loads(file.read_text())
        manifest = Manifest.model_validate(data)
    except (OSError, ValueError, ValidationError) as exc:
        raise StateError(
            f"image manifest {file} is unreadable: {str(exc).splitlines()[0]}",
            hint="remove the broken image with `mvmctl cleanup` and build again",
        ) from None
    if manifest.schema_version != MANIFEST_SCHEMA:
        raise StateError(
            f"image manifest {file} has schema_version {manifest.schema_version}, "
            f"this mvm reads {MANIFEST_SCHEMA}",
            hint="rebuild the image with this version of mvm",
        )
    return manifest


def _outdated(path: Path) -> bool:
    try:
        version = json.loads((path / MANIFEST).read_text()).get("schema_version")
    except (OSError, ValueError, AttributeError):
        return False  # missing or broken: read_manifest says so
    return isinstance(version, int) and version < MANIFEST_SCHEMA


def link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, key: str) -> Path:
        return self.root / key

    def lock_path(self, key: str) -> Path:
        return self.root / f".{key}.lock"

    @contextmanager
    def locked(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """The image's lock. Held to build it, to remove it, and by an ``up`` from the moment
        it has the image until its VM's record names it: ``rmi`` and ``cleanup`` look for the
        VMs using an image under this lock, so neither removes an image an ``up`` is taking."""
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.lock_path(key), on_wait=on_wait):
            yield

    def get(self, key: str) -> Image | None:
        """The image stored under ``key``; None if there is none, or only one written by an
        older mvm (its manifest schema), which the next :meth:`publish` replaces."""
        path = self._dir(key)
        if not (path / MANIFEST).is_file() or _outdated(path):
            return None
        return Image(path, read_manifest(path))

    def all(self) -> list[Image]:
        images = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
                    continue
                try:
                    images.append(Image(entry, read_manifest(entry)))
                except StateError:
                    continue
        return sorted(images, key=lambda i: i.manifest.created_at)

    def publish(self, key: str, make: Callable[[Path], Manifest],
                on_wait: Callable[[], None] | None = None) -> Image:
        """Build into a temp dir with ``make`` and rename it to ``images/<key>``. ``on_wait``:
        called if another process is building it (this one then takes its image)."""
        with self.locked(key, on_wait):
            existing = self.get(key)
            if existing is not None:
                return existing
            if _outdated(self._dir(key)):
                remove_tree(self._dir(key))
            staging = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=self.root))
            try:
                started = time.monotonic()
                manifest = make(staging)
                manifest.key = key
                manifest.created_at = time.time()
                manifest.build_secs = round(time.monotonic() - started, 2)
                manifest.sizes = {
                    f.name: f.stat().st_size for f in staging.iterdir() if f.is_file()
                }
                # by alias: the guest in the seed's own spelling (healthChecks, preStart), as in guest.json
                write_json_atomic(staging / MANIFEST, manifest.model_dump(mode="json", by_alias=True))
                os.rename(staging, self._dir(key))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return Image(self._dir(key), manifest)

    # -- users in other state dirs ------------------------------------------------------------
    # A cache may be shared by several state dirs (MVM_HOME=a and b, one MVM_CACHE). Each reads
    # only its own VM records, so every VM also leaves a marker here, beside the image, naming
    # its VM dir: `rmi` and `cleanup` of any state dir then find it (and judge its record).
    # Added and removed under the image's lock.

    def _user_marker(self, key: str, vm_dir: Path) -> Path:
        digest = hashlib.sha256(str(vm_dir.resolve()).encode()).hexdigest()[:16]
        return self.root / USERS / key / f"{digest}.json"

    def add_user(self, key: str, vm_dir: Path) -> None:
        """Record that the VM in ``vm_dir`` uses image ``key`` (under the image's lock)."""
        marker = self._user_marker(key, vm_dir)
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(marker, {"schema_version": USERS_SCHEMA, "vm_dir": str(vm_dir.resolve())})

    def remove_user(self, key: str, vm_dir: Path) -> None:
        """Forget that mark, if the VM dir is gone (under the image's lock: an ``up`` of the
        same name that took the dir again since keeps its own). Never fails: the VM is gone."""
        marker = self._user_marker(key, vm_dir)
        if not marker.exists():
            return  # never marked (an older mvm's VM), or dropped already: no lock file made for it
        try:
            with self.locked(key):
                if vm_dir.exists():
                    return
                marker.unlink(missing_ok=True)
                try:
                    marker.parent.rmdir()
                except OSError:
                    pass  # other VMs use it
        except OSError:
            pass  # a read-only or full cache: a stale mark is dropped by the next look

    def user_dirs(self, key: str) -> list[Path]:
        """The VM dirs, in any state dir, marked as using image ``key`` and still there (a
        mark whose dir is gone is dropped). Whether the VM there still uses it, and needs it,
        is its record's to say (:func:`mvm._api.images.other_users`)."""
        found = []
        for marker in sorted((self.root / USERS / key).glob("*.json")):
            try:
                vm_dir = Path(json.loads(marker.read_text())["vm_dir"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: left for the next look
            if vm_dir.is_dir():
                found.append(vm_dir)
            else:
                marker.unlink(missing_ok=True)
        return found

    def marked_keys(self) -> list[str]:
        users = self.root / USERS
        return sorted(d.name for d in users.iterdir() if d.is_dir()) if users.is_dir() else []

    def stale_staging(self) -> list[Path]:
        """Leftovers of interrupted builds (only ever named ``.build-*``); a staging dir whose
        build still holds its lock is in use, not stale."""
        if not self.root.is_dir():
            return []
        stale = []
        for staging in self.root.glob(".build-*"):
            prefix = staging.name.split("-")[1]  # .build-<key[:12]>-<random>
            building = any(held(lock) for lock in self.root.glob(f".{prefix}*.lock"))
            if staging.is_dir() and not building:
                stale.append(staging)
        return stale
