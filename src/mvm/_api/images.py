"""``images`` and ``rmi``: the content-addressed image store, listed and pruned by hand.

An image is removed under its build lock (so a build of the same key waits), and never
while a VM that runs (or is starting), or a suspended VM that resumes from it, uses it. Its
templates go with it (VMs restored from them keep their own links to what they need).
``cleanup`` prunes unused images by age.
"""

from __future__ import annotations

from .._atomic import remove_tree
from ..errors import MvmError, UsageError
from ..images.store import Image, ImageStore
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


def rmi(ref: str, *, layout: Layout | None = None) -> list[ImageInfo]:
    """Remove the image(s) ``ref`` names: a key (or a prefix of 4+ characters that starts
    no other key), or a guest name (all of its images). Refused while a running or
    suspended VM uses one."""
    from filelock import FileLock

    layout = layout or Layout.default()
    store = ImageStore(layout.images)
    found = _match(ref, store)
    if not found:
        raise UsageError(f"no image {ref!r} (by key or guest name)", hint="list them with `mvmctl images`")
    users = _users(layout)
    for img in found:
        needed = [n for n, needs in users.get(img.key, []) if needs]
        if needed:
            raise UsageError(f"image {img.key[:12]} ({img.name}) is used by running or suspended VM(s): "
                             f"{', '.join(needed)}",
                             hint=f"stop them first (a suspended VM's saved state goes too): "
                             f"mvmctl down {' '.join(needed)}")
    removed = []
    templates = TemplateStore(layout)
    for img in found:
        lock = layout.images / f".{img.key}.lock"
        with FileLock(str(lock)):
            remove_tree(img.path)
        lock.unlink(missing_ok=True)
        for key, template, _ in templates.all():  # of no use without their image (a clone keeps its own links)
            if template is not None and template.meta.image_key == img.key:
                templates.remove(key)
        removed.append(image_info(img))
    return removed
