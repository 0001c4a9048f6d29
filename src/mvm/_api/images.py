"""``images`` and ``rmi``: the content-addressed image store, listed and pruned by hand.

An image is removed under its build lock (so a build of the same key waits), and never
while a VM that runs (or is starting), or a suspended VM that resumes from it, uses it. Its
templates go with it (VMs restored from them keep their own links to what they need).
``cleanup`` prunes unused images by age.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .._atomic import remove_tree
from .._locks import remove_unheld
from ..builders.store import Image, ImageStore
from ..errors import MvmError, UsageError
from ..paths import Layout
from ..runtime.registry import Registry
from ..runtime.templates import TemplateStore
from .build import image_info
from .machines import backend_for, status_of
from .models import ImageInfo


def _users(layout: Layout) -> dict[str, list[tuple[str, bool]]]:
    """Image key → [(VM name, whether that VM needs it now: it runs, or is suspended)]."""
    registry = Registry(layout)
    users: dict[str, list[tuple[str, bool]]] = {}
    for name in registry.names():
        try:
            record = registry.load(name)
            needs = status_of(record, registry.files(name), backend_for(record)).kept
        except MvmError:
            continue
        users.setdefault(record.image_key, []).append((name, needs))
    return users


def images(*, layout: Layout | None = None) -> list[ImageInfo]:
    """Every image in the store, oldest first, with the VMs that use it."""
    layout = layout or Layout.default()
    users = _users(layout)
    return [image_info(img).model_copy(update={"vms": [n for n, _ in users.get(img.key, [])]})
            for img in ImageStore(layout.images).all()]


def _match(ref: str, store: ImageStore) -> list[Image]:
    """The one image a key (or a prefix of it) names, or every image of a guest name. A
    prefix of two keys is refused, as `docker rmi` refuses one: it names neither."""
    everything = store.all()
    by_key = [img for img in everything if len(ref) >= 4 and img.key.startswith(ref)]
    if len(by_key) > 1:
        raise UsageError(f"{ref!r} is the start of {len(by_key)} image keys: "
                         + ", ".join(f"{img.key[:16]} ({img.name})" for img in by_key),
                         hint="give more of the key (`mvmctl images` lists them)")
    return by_key or [img for img in everything if img.name == ref]


def other_users(layout: Layout, key: str) -> list[tuple[Path, str]]:
    """(state dir, VM name) of each VM of another state dir sharing this cache that needs
    image ``key`` now (it runs, or is suspended), as its own record says; one whose record
    cannot be read counts (it may resume), one whose record names another image does not
    (a new VM of that name)."""
    mine = layout.vms.resolve()
    found = []
    for vm_dir in ImageStore(layout.images).user_dirs(key):
        if vm_dir.parent.resolve() == mine:
            continue  # this state dir's VMs are judged by _users
        state = vm_dir.parent.parent
        registry = Registry(Layout(state=state, cache=layout.cache))
        try:
            record = registry.load(vm_dir.name)
            if record.image_key != key:
                continue
            needs = status_of(record, registry.files(vm_dir.name), backend_for(record)).kept
        except MvmError:
            needs = True
        if needs:
            found.append((state, vm_dir.name))
    return found


def _needing(layout: Layout, key: str) -> list[str]:
    """The VMs that need image ``key`` now: they run (or are starting), or are suspended;
    also those of other state dirs (``MVM_STATE=DIR NAME``)."""
    own = [name for name, needs in _users(layout).get(key, []) if needs]
    return own + [f"MVM_STATE={shlex.quote(str(state))} {name}" for state, name in other_users(layout, key)]


def remove_unneeded(layout: Layout, key: str) -> list[str]:
    """Remove image ``key`` unless a VM needs it, and return the VMs that do (then nothing is
    removed). They are looked for under the image's lock, under which an ``up`` records the
    VM that takes the image (:meth:`ImageStore.locked`): an ``up`` either is seen here or
    finds the image gone. Its templates stay: the caller removes or reports them."""
    store = ImageStore(layout.images)
    with store.locked(key):
        needed = _needing(layout, key)
        if needed:
            return needed
        remove_tree(store.root / key, ignore_errors=True)
    remove_unheld(store.lock_path(key), store.root / key)
    return []


def rmi(ref: str, *, layout: Layout | None = None) -> list[ImageInfo]:
    """Remove the image(s) ``ref`` names: a key (or a prefix of 4+ characters that starts
    no other key), or a guest name (all of its images). Refused while a running or
    suspended VM uses one."""
    layout = layout or Layout.default()
    store = ImageStore(layout.images)
    found = _match(ref, store)
    if not found:
        short = " (a key prefix needs at least 4 characters)" if len(ref) < 4 else ""
        raise UsageError(f"no image {ref!r} (by key or guest name){short}", hint="list them with `mvmctl images`")
    for img in found:  # all are checked before any goes; each again as it goes
        _refuse_if_needed(img, _needing(layout, img.key))
    removed = []
    templates = TemplateStore(layout)
    for img in found:
        _refuse_if_needed(img, remove_unneeded(layout, img.key))
        for key, template, _ in templates.all():  # of no use without their image (a clone keeps its own links)
            if template is not None and template.meta.image_key == img.key:
                templates.remove(key)
        removed.append(image_info(img))
    return removed


def _refuse_if_needed(img: Image, needed: list[str]) -> None:
    if needed:
        own = [n for n in needed if not n.startswith("MVM_STATE=")]
        downs = ([f"mvmctl down {' '.join(own)}"] if own else []) + [
            " mvmctl down ".join(n.rsplit(" ", 1)) for n in needed if n.startswith("MVM_STATE=")]
        raise UsageError(f"image {img.key[:12]} ({img.name}) is used by running or suspended VM(s): "
                         f"{', '.join(needed)}",
                         hint=f"stop them first (a suspended VM's saved state goes too): {'; '.join(downs)}")
