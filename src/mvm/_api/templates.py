"""Fast start: choosing a template for an ``up``, and the public API (create, list, remove).
The store is :mod:`mvm.runtime.templates`, which explains what a template holds; the maker,
:mod:`mvm._api.template_maker`.

Making one is a boot with ``mvm.template=1`` and the RAM in a shared file: the guest agent
comes up and waits for its config; the machine is saved (``agent``); then it gets the
image's default config, its services start, its checks turn healthy, and it is saved again
(``ready``). After the first cold ``up`` of an image and shape, a detached ``mvmctl`` makes
one in the background (``MVM_TEMPLATES=restore`` only restores, ``off`` neither);
``mvmctl template create`` makes one now.

An ``up`` with ``-e`` restores ``agent`` and starts its services from nothing (under TCG, a
Python service's start-up is most of that ``up``). After one, a detached maker restores
``agent`` once more, gives it the same values, and saves it when healthy: a ``ready`` state
for those values, which the next ``up`` with exactly them restores (see
:mod:`mvm.runtime.templates`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .._locks import held
from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import SAVE_RESTORE, Backend
from ..builders.store import Image, ImageStore
from ..errors import UsageError
from ..paths import Layout
from ..runtime.templates import (
    HOTPLUG_SLOTS,
    Damaged,
    Kind,
    Template,
    TemplateStore,
    bytes_on_disk,
    env_digest,
    key_for,
)
from .models import TemplateInfo
from .options import check_host_cpus, check_host_memory
from .progress import Progress

log = logging.getLogger(__name__)

NO_TEMPLATE = "no template yet for this image and shape"
COLD_FORCED = "--cold"  #: the start reason of a VM started with --cold, which restart keeps


MODES = ("auto", "restore", "off")


def mode() -> str:
    """``auto`` (restore, and make templates after cold boots; also when unset or empty),
    ``restore`` or ``off``. Any other value is refused: a typo must not quietly mean auto."""
    value = os.environ.get("MVM_TEMPLATES") or "auto"
    if value not in MODES:
        raise UsageError(f"MVM_TEMPLATES={value!r} is not a templates mode",
                         hint="set it to auto (the default), restore or off, or unset it")
    return value


@dataclass(frozen=True)
class Restore:
    template: Template
    kind: Kind
    #: the saved state's file stem: the kind, or a ``ready`` state with these ``-e`` values
    stem: str


@dataclass(frozen=True)
class Choice:
    """A template to restore from (or None), why, and whether the reason deserves a warning
    (a template that should have been used could not be)."""

    restore: Restore | None
    reason: str
    warn: bool = False


def choose(image: Image, *, cpus: int, memory: int, env: Mapping[str, str], volumes: int, shares: bool,
           cold: bool, backend: Backend, layout: Layout) -> Choice:
    """A template to restore this ``up`` from, or the reason for a cold boot."""
    if cold:
        return Choice(None, COLD_FORCED)
    if mode() == "off":
        return Choice(None, "templates are off (MVM_TEMPLATES=off)")
    if SAVE_RESTORE not in backend.capabilities():
        return Choice(None, f"the {backend.name} backend cannot restore machines")
    if shares:
        return Choice(None, "a shared directory (virtiofs) cannot be restored")
    if volumes > HOTPLUG_SLOTS:
        return Choice(None, f"{volumes} volumes: a restored VM takes at most {HOTPLUG_SLOTS}", warn=True)
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    try:
        template = store.get(key)
    except Damaged as exc:
        store.remove(key)
        return Choice(None, f"the template was damaged ({exc}) and is removed; a new one will be made", warn=True)
    if template is None:
        busy = held(store.lock_path(key))
        return Choice(None, "the template for this image and shape is still being made" if busy else
                      NO_TEMPLATE)
    if env and not volumes:
        digest = env_digest(env)
        try:
            stem = store.env_state(template, digest)
        except Damaged as exc:
            log.warning("the template's state for these -e values was damaged (%s); removed", exc)
            store.remove_env_state(template, digest)
            stem = None
        if stem is not None:
            return Choice(Restore(template, "ready", stem),
                          f"restored from template {key[:12]} (ready, with these -e values)")
    kind: Kind = "agent" if (env or volumes) else "ready"
    if kind not in template.meta.kinds:
        return Choice(None, f"the template has no {kind!r} state (its services never became healthy)", warn=True)
    return Choice(Restore(template, kind, kind), f"restored from template {key[:12]} ({kind})")


def missing(image: Image, *, cpus: int, memory: int, backend: Backend, layout: Layout) -> bool:
    """Should a template be made in the background now? (``auto`` mode, a backend that can
    restore, and no template, not even one being made.)"""
    if mode() != "auto" or SAVE_RESTORE not in backend.capabilities():
        return False
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    return not store.dir(key).exists() and not held(store.lock_path(key))


def make_behind(image: Image, *, cpus: int, memory: int, restore: Restore | None, env: Mapping[str, str],
                volumes: bool, forced_cold: bool, backend: Backend, layout: Layout, runner: Runner) -> str | None:
    """After an ``up``: after a cold boot (unless forced: ``--cold``, shares), the image's template;
    after a restore from ``agent`` for ``-e`` values alone, a ``ready`` state for those values.
    Each is made by a detached maker, if it is missing and no maker is at work on it (the
    maker's module is imported only then). Returns what was started, for the user: the maker
    boots a VM of its own that ``ls`` does not list."""
    made_env: Mapping[str, str] | None
    if restore is None and not forced_cold and missing(image, cpus=cpus, memory=memory, backend=backend,
                                                      layout=layout):
        made_env = None
        what = (f"making the image's template in the background (a VM of {memory} MiB for a few seconds, "
                "not listed by `mvmctl ls`); the next `up` of this image and shape restores it")
    elif restore is not None and restore.kind == "agent" and not volumes and \
            env_state_missing(image, cpus=cpus, memory=memory, env=env, backend=backend, layout=layout):
        made_env = env
        what = ("saving a ready state for these -e values in the background (a VM for a few seconds, not "
                "listed by `mvmctl ls`); the next `up` with exactly these values restores it")
    else:
        return None
    from .template_maker import make_in_background

    make_in_background(image, cpus=cpus, memory=memory, layout=layout, backend=backend.name, runner=runner,
                       env=made_env)
    return f"{what} (`mvmctl template ls`)"


def env_state_missing(image: Image, *, cpus: int, memory: int, env: Mapping[str, str], backend: Backend,
                      layout: Layout) -> bool:
    """Should a ``ready`` state with these ``-e`` values be made in the background now? (``auto``
    mode, a template with an ``agent`` state, none for these values, no maker at work.)"""
    if mode() != "auto" or not env or SAVE_RESTORE not in backend.capabilities():
        return False
    store = TemplateStore(layout)
    key = key_for(image, cpus, memory, backend)
    try:
        template = store.get(key)
        if template is None or "agent" not in template.meta.kinds or store.env_state(template, env_digest(env)):
            return False
    except Damaged:
        return False
    return not held(store.lock_path(key))


# -- the public API: create, list, remove ---------------------------------------------------


def template_create(path: str | os.PathLike[str] = ".", *, flake: str | None = None, nix_args: Sequence[str] = (),
                    cpus: int | None = None, memory: int | None = None, arch: str | None = None,
                    layout: Layout | None = None, runner: Runner = DEFAULT_RUNNER,
                    progress: Progress | None = None, health_timeout: float | None = None) -> TemplateInfo:
    """Build the image if needed and make its template for this shape now (an ``up`` of the
    same image and shape then restores it). A guest not healthy within ``health_timeout``
    (default 120 s; 0: do not wait) gets a template whose clones start their services anew."""
    from ..names import HEALTH_TIMEOUT
    from .build import build_image
    from .template_maker import make_template

    layout = layout or Layout.default()
    image, _ = build_image(path, flake=flake, nix_args=nix_args, arch=arch, layout=layout, runner=runner,
                           progress=progress)
    guest = image.manifest.guest
    check_host_cpus(cpus or guest.cpus, f"--cpus {cpus}" if cpus else f"the spec's cpus = {guest.cpus}")
    check_host_memory(memory or guest.memory, f"--memory {memory}" if memory else f"the spec's memory = {guest.memory}")
    template = make_template(image, cpus=cpus or guest.cpus, memory=memory or guest.memory, layout=layout,
                             runner=runner, progress=progress,
                             health_timeout=HEALTH_TIMEOUT if health_timeout is None else health_timeout)
    return _info(template.meta.key, template, None, layout)


def _info(key: str, template: Template | None, damaged: str | None, layout: Layout) -> TemplateInfo:
    if template is None:
        path = TemplateStore(layout).dir(key)
        return TemplateInfo(key=key, path=str(path), bytes_on_disk=bytes_on_disk(path),
                            bytes_shared=bytes_on_disk(path, shared_only=True), damaged=damaged)
    meta = template.meta
    image = ImageStore(layout.images).get(meta.image_key)
    return TemplateInfo(key=key, path=str(template.path), image=meta.image_key, name=image.name if image else None,
                        kinds=list(meta.kinds), env_states=len(template.env_states()), cpus=meta.shape.cpus,
                        memory=meta.shape.memory,
                        arch=meta.shape.arch, created_at=meta.created_at, create_secs=meta.create_secs,
                        bytes_on_disk=template.bytes_on_disk,
                        bytes_shared=bytes_on_disk(template.path, shared_only=True))


def templates_list(*, layout: Layout | None = None) -> list[TemplateInfo]:
    """Every template, with its image, shape and disk use (damaged ones say why)."""
    layout = layout or Layout.default()
    return [_info(key, t, why, layout) for key, t, why in TemplateStore(layout).all()]


def template_rm(key: str, *, layout: Layout | None = None) -> TemplateInfo:
    """Remove a template (by key, its first 4+ characters, or the guest name of its image
    when that guest has one template)."""
    layout = layout or Layout.default()
    everything = templates_list(layout=layout)
    matches = ([info for info in everything if len(key) >= 4 and info.key.startswith(key)]
               or [info for info in everything if info.name == key])
    if not matches:
        short = " (a key prefix needs at least 4 characters)" if len(key) < 4 else ""
        raise UsageError(f"no template {key!r} (by key or guest name){short}",
                         hint="list them with `mvmctl template ls`")
    if len(matches) > 1:
        raise UsageError(f"{key!r} names {len(matches)} templates: "
                         + ", ".join(f"{info.key[:12]} ({info.name}, {info.cpus} vCPU, {info.memory} MiB)"
                                     for info in matches),
                         hint="give one's key (`mvmctl template ls` lists them)")
    TemplateStore(layout).remove(matches[0].key)
    return matches[0]
