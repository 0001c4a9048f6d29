"""The template store: saved machines that ``up`` restores instead of booting (fast start).

A template belongs to one image and one machine shape (vCPUs, memory, architecture, the
device set, the QEMU binary): the key covers them all, so a change to any makes a new
template and the old one unused. It holds up to two saved states of one boot:

- ``agent``: the guest agent is up and waits for its per-boot config (``-e``, volumes,
  name); services have not started. Used when an ``up`` brings its own config.
- ``ready``: the config was the image's defaults and every service is running and every
  health check healthy. Used when an ``up`` brings no ``-e`` and no volumes.

Each state is three files: the machine (``STEM.state``, without its RAM), its RAM
(``STEM.ram``, mapped copy-on-write by every clone, so clones share the pages they do not
change) and its root disk (``STEM.qcow2``, the backing of every clone's own overlay); the
stem is the kind's name.

A template may also hold a few ``ready`` states made with other ``-e`` values (stem
``ready-env-DIGEST``, added after the template, each with its own ``STEM.json``): an ``up``
with exactly those values restores one instead of starting its services from nothing.

A template is published whole (built in a staging dir, renamed into place). ``get`` trusts
it only if every file still has the size and change time recorded at publication: a
template that was written to, truncated or half-deleted since is reported as damaged, and
``up`` boots cold and makes a new one.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from .._atomic import remove_tree, write_json_atomic
from .._locks import remove_unheld
from ..backends.base import Backend
from ..builders.store import Image
from ..errors import StateError
from ..paths import Layout

TEMPLATE_SCHEMA = 1
META = "template.json"
Kind = Literal["agent", "ready"]
#: ``ready`` states with other ``-e`` values kept per template; making another drops the oldest.
MAX_ENV_STATES = 3
#: Empty PCIe slots every template (and so every clone) has, for the volumes of a restored
#: ``up``. More volumes than this boot cold.
HOTPLUG_SLOTS = 4
#: The kernel argument that makes a boot a template (the guest waits for ``configure``).
TEMPLATE_ARG = "mvm.template=1"
#: Native PCIe hot-plug: microvm has no ACPI _OSC to hand it to the kernel, so without this
#: the hot-plug slots are never registered and a disk attached after a restore is not seen.
TEMPLATE_KERNEL_ARGS = (TEMPLATE_ARG, "pcie_ports=native")
#: How long the host waits for ``configure``: the guest replies once the clone's volumes are
#: mounted and its services started, or after its own 25 s (mvm.guest.init.CONFIGURE_TIMEOUT).
CONFIGURE_TIMEOUT = 30.0


class Shape(BaseModel):
    cpus: int
    memory: int
    arch: str


class TemplateMeta(BaseModel):
    schema_version: int = TEMPLATE_SCHEMA
    key: str
    image_key: str
    shape: Shape
    kinds: list[Kind]
    hotplug_slots: int
    created_at: float
    create_secs: float
    #: file name -> [size, mtime_ns, ctime_ns] at publication
    files: dict[str, list[int]]


class EnvState(BaseModel):
    """A ``ready`` state made with other ``-e`` values (``ready-env-DIGEST.json``)."""

    schema_version: int = TEMPLATE_SCHEMA
    digest: str
    created_at: float
    create_secs: float
    #: file name -> [size, mtime_ns, ctime_ns] when it was added
    files: dict[str, list[int]]


#: The files of one saved state, by suffix (``STEM.SUFFIX``).
STATE_FILES = ("state", "ram", "qcow2", "console.log", "events.log")


def env_digest(env: Mapping[str, str]) -> str:
    """Names the ``ready`` state made with these ``-e`` values."""
    return hashlib.sha256(json.dumps(sorted(env.items())).encode()).hexdigest()[:16]


def env_stem(digest: str) -> str:
    return f"ready-env-{digest}"


@dataclass(frozen=True)
class Template:
    path: Path
    meta: TemplateMeta

    def state(self, stem: str) -> Path:
        return self.path / f"{stem}.state"

    def ram(self, stem: str) -> Path:
        return self.path / f"{stem}.ram"

    def root(self, stem: str) -> Path:
        return self.path / f"{stem}.qcow2"

    def link_for_clone(self, stem: str, clone_dir: Path) -> tuple[Path, Path]:
        """The state's root disk and RAM file as a clone uses them: hard links in its own dir,
        so that removing the template (``template rm``, a new ``-e`` state pushing out an old
        one) cannot take them from a clone that still needs them (``resume`` opens them
        again). Where no link can be made (another file system, one without hard links, a
        file at its link limit), the template's own files."""
        linked = []
        for src in (self.root(stem), self.ram(stem)):
            dest = clone_dir / f"template-{src.name.split('.')[-1]}"
            try:
                os.link(src, dest)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                    raise
                dest = src
            linked.append(dest)
        return linked[0], linked[1]

    def log(self, stem: str, name: str) -> Path:
        """The console or event log of the boot up to the save (a clone's history)."""
        return self.path / f"{stem}.{name}"

    def env_states(self) -> list[str]:
        """The digests of the ``ready`` states with other ``-e`` values, oldest first."""
        found = [(f.stat().st_mtime_ns, f.name[len("ready-env-"):-len(".json")])
                 for f in self.path.glob("ready-env-*.json")]
        return [digest for _, digest in sorted(found)]

    @property
    def bytes_on_disk(self) -> int:
        return bytes_on_disk(self.path)


def bytes_on_disk(path: Path, *, shared_only: bool = False) -> int:
    """What a template dir (flat: states, disks, logs) holds on disk; 0 if it is gone.
    ``shared_only``: only its files that restored VMs link to too (:meth:`Template.link_for_clone`)."""
    if not path.is_dir():
        return 0
    stats = [f.stat() for f in path.iterdir() if f.is_file()]
    return sum(st.st_blocks * 512 for st in stats if st.st_nlink > 1 or not shared_only)


#: The device set and the guest's template protocol: part of every template key.
VERSION = "template-1"


def key_for(image: Image, cpus: int, memory: int, backend: Backend) -> str:
    """The key of ``image``'s template in this shape, as ``backend`` makes one."""
    shape = Shape(cpus=cpus, memory=memory, arch=image.manifest.arch)
    return template_key(image.key, shape, backend.machine_version(image.manifest.arch), VERSION)


def identity(seed_for: str, hostname: str | None) -> dict[str, object]:
    """What makes a clone its own machine: fresh RNG bytes from the host, its hostname."""
    return {"seed": base64.b64encode(os.urandom(64)).decode(), "hostname": hostname or seed_for}


def template_key(image_key: str, shape: Shape, qemu: str, version: str) -> str:
    """What a saved machine depends on: the image, the shape, the device set and QEMU."""
    try:
        st = os.stat(qemu)
        binary = f"{qemu}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        binary = qemu
    parts = {"image": image_key, "shape": shape.model_dump(), "slots": HOTPLUG_SLOTS, "qemu": binary,
             "version": version, "schema": TEMPLATE_SCHEMA}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _check(path: Path, recorded_files: dict[str, list[int]]) -> None:
    """Raise :class:`Damaged` unless every file still has its recorded size and mtime (not
    its ctime, also recorded: a clone's hard link to the file changes that, see
    :meth:`Template.link_for_clone`)."""
    for name, recorded in recorded_files.items():
        try:
            now = fingerprint(path / name)
        except OSError:
            raise Damaged(f"{name} is missing") from None
        if now[0] != recorded[0]:
            raise Damaged(f"{name} is {now[0]} bytes, not {recorded[0]} (truncated?)")
        if now[:2] != recorded[:2]:
            raise Damaged(f"{name} was changed after the template was saved")


class Damaged(StateError):
    """A template on disk that cannot be trusted (the message says why). ``up`` boots cold
    instead and removes it; where one reaches the user, the hint says how to get rid of it."""

    def __init__(self, message: str) -> None:
        super().__init__(f"damaged template: {message}",
                         hint="`mvmctl template rm KEY` or `mvmctl cleanup` removes it; the next `up` makes it again")
        self.reason = message

    def __str__(self) -> str:
        return self.reason


class TemplateStore:
    def __init__(self, layout: Layout) -> None:
        self.root = layout.templates

    def dir(self, key: str) -> Path:
        return self.root / key

    def lock_path(self, key: str) -> Path:
        return self.root / f".{key}.lock"

    def get(self, key: str) -> Template | None:
        """The template ``key``; None if there is none; :class:`Damaged` if it changed."""
        path = self.dir(key)
        if not path.is_dir():
            return None
        try:
            meta = TemplateMeta.model_validate_json((path / META).read_text())
        except (OSError, ValidationError) as exc:
            raise Damaged(f"its {META} is unreadable: {str(exc).splitlines()[0]}") from None
        _check(path, meta.files)
        return Template(path, meta)

    def env_state(self, template: Template, digest: str) -> str | None:
        """The stem of ``template``'s ``ready`` state with the ``-e`` values of ``digest``;
        None if it has none; :class:`Damaged` if it changed since it was added."""
        meta_path = template.path / f"{env_stem(digest)}.json"
        if not meta_path.exists():
            return None
        try:
            meta = EnvState.model_validate_json(meta_path.read_text())
        except (OSError, ValidationError) as exc:
            raise Damaged(f"{meta_path.name} is unreadable: {str(exc).splitlines()[0]}") from None
        _check(template.path, meta.files)
        return env_stem(digest)

    def add_env_state(self, template: Template, digest: str, staged: Path, create_secs: float) -> str:
        """Move the state files of ``staged`` (``STATE_FILES``, by suffix) into ``template``;
        the state exists once its ``.json`` is written, last. Drops the oldest beyond
        ``MAX_ENV_STATES``."""
        stem = env_stem(digest)
        for suffix in STATE_FILES:
            os.rename(staged / suffix, template.path / f"{stem}.{suffix}")
        meta = EnvState(digest=digest, created_at=time.time(), create_secs=create_secs,
                        files={f"{stem}.{s}": fingerprint(template.path / f"{stem}.{s}") for s in STATE_FILES})
        write_json_atomic(template.path / f"{stem}.json", meta.model_dump(mode="json"))
        for old in template.env_states()[:-MAX_ENV_STATES]:
            self.remove_env_state(template, old)
        return stem

    def remove_env_state(self, template: Template, digest: str) -> None:
        """Its ``.json`` first: a half-removed state is never trusted."""
        stem = env_stem(digest)
        (template.path / f"{stem}.json").unlink(missing_ok=True)
        for suffix in STATE_FILES:
            (template.path / f"{stem}.{suffix}").unlink(missing_ok=True)

    def all(self) -> list[tuple[str, Template | None, str | None]]:
        """(key, template or None, why it is damaged) of every template on disk."""
        out: list[tuple[str, Template | None, str | None]] = []
        if not self.root.is_dir():
            return out
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                out.append((entry.name, self.get(entry.name), None))
            except Damaged as exc:
                out.append((entry.name, None, str(exc)))
        return out

    def publish(self, staging: Path, meta: TemplateMeta) -> Template:
        """Record every file's fingerprint, then rename ``staging`` into place (replacing a
        damaged template of the same key)."""
        meta.files = {f.name: fingerprint(f) for f in sorted(staging.iterdir())
                      if f.is_file() and f.name != META}
        write_json_atomic(staging / META, meta.model_dump(mode="json"))
        self.remove(meta.key)
        os.rename(staging, self.dir(meta.key))
        return Template(self.dir(meta.key), meta)

    def remove(self, key: str) -> None:
        """The template, then its lock file unless a maker holds it (a maker replacing a
        damaged template calls this under its lock)."""
        remove_tree(self.dir(key), ignore_errors=True)  # no half-removed template is ever seen
        remove_unheld(self.lock_path(key), self.dir(key))
