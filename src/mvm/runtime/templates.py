"""The template store: saved machines that ``up`` restores instead of booting (fast start).

A template belongs to one image and one machine shape (vCPUs, memory, architecture, the
device set, the QEMU binary): the key covers them all, so a change to any makes a new
template and the old one unused. It holds up to two saved states of one boot:

- ``agent``: the guest agent is up and waits for its per-boot config (``-e``, volumes,
  name); services have not started. Used when an ``up`` brings its own config.
- ``ready``: the config was the image's defaults and every service is running and every
  health check healthy. Used when an ``up`` brings no ``-e`` and no volumes.

Each state is three files: the machine (``KIND.state``, without its RAM), its RAM
(``KIND.ram``, mapped copy-on-write by every clone, so clones share the pages they do not
change) and its root disk (``KIND.qcow2``, the backing of every clone's own overlay).

A template is published whole (built in a staging dir, renamed into place). ``get`` trusts
it only if every file still has the size and change time recorded at publication: a
template that was written to, truncated or half-deleted since is reported as damaged, and
``up`` boots cold and makes a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from .._atomic import write_json_atomic
from ..paths import Layout

TEMPLATE_SCHEMA = 1
META = "template.json"
Kind = Literal["agent", "ready"]
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


@dataclass(frozen=True)
class Template:
    path: Path
    meta: TemplateMeta

    def state(self, kind: Kind) -> Path:
        return self.path / f"{kind}.state"

    def ram(self, kind: Kind) -> Path:
        return self.path / f"{kind}.ram"

    def root(self, kind: Kind) -> Path:
        return self.path / f"{kind}.qcow2"

    def log(self, kind: Kind, name: str) -> Path:
        """The console or event log of the boot up to the save (a clone's history)."""
        return self.path / f"{kind}.{name}"

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_blocks * 512 for f in self.path.iterdir() if f.is_file())


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


class Damaged(Exception):
    """A template on disk that cannot be trusted (the message says why)."""


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
        for name, recorded in meta.files.items():
            try:
                now = fingerprint(path / name)
            except OSError:
                raise Damaged(f"{name} is missing") from None
            if now[0] != recorded[0]:
                raise Damaged(f"{name} is {now[0]} bytes, not {recorded[0]} (truncated?)")
            if now != recorded:
                raise Damaged(f"{name} was changed after the template was saved")
        return Template(path, meta)

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
        path = self.dir(key)
        if path.exists():
            trash = self.root / f".trash-{key}-{time.monotonic_ns()}"
            os.rename(path, trash)  # one rename: no half-removed template is ever seen
            shutil.rmtree(trash, ignore_errors=True)
