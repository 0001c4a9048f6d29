"""The template store's ``ready`` states for ``-e`` values: added whole, trusted only while
unchanged, capped (oldest dropped), removed cleanly. Files stand in for QEMU's state here;
tests/e2e/test_fast_start.py restores real ones."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mvm.paths import Layout
from mvm.runtime.templates import (
    MAX_ENV_STATES,
    STATE_FILES,
    Damaged,
    Shape,
    Template,
    TemplateMeta,
    TemplateStore,
    env_digest,
)


@pytest.fixture
def store_and_template(tmp_path: Path) -> tuple[TemplateStore, Template]:
    store = TemplateStore(Layout(state=tmp_path / "state", cache=tmp_path / "cache"))
    store.root.mkdir(parents=True)
    staging = store.root / ".build-x"
    staging.mkdir()
    for stem in ("agent", "ready"):
        for suffix in STATE_FILES:
            (staging / f"{stem}.{suffix}").write_bytes(b"x" * 64)
    meta = TemplateMeta(key="k" * 32, image_key="i", shape=Shape(cpus=1, memory=512, arch="x86_64"),
                        kinds=["agent", "ready"], hotplug_slots=4, created_at=0.0, create_secs=0.0, files={})
    return store, store.publish(staging, meta)


def _add(store: TemplateStore, template: Template, env: dict[str, str]) -> str:
    staged = store.root / f".env-{env_digest(env)}"
    staged.mkdir()
    for suffix in STATE_FILES:
        (staged / suffix).write_bytes(b"y" * 128)
    stem = store.add_env_state(template, env_digest(env), staged, 1.0)
    staged.rmdir()  # every file was moved in
    return stem


def test_the_digest_names_the_values_not_their_order() -> None:
    assert env_digest({"A": "1", "B": "2"}) == env_digest({"B": "2", "A": "1"})
    assert env_digest({"A": "1"}) != env_digest({"A": "2"}) != env_digest({})


def test_a_state_for_env_values_is_found_only_for_exactly_those(store_and_template: tuple[TemplateStore, Template]
                                                                ) -> None:
    store, template = store_and_template
    stem = _add(store, template, {"K": "V"})
    assert store.env_state(template, env_digest({"K": "V"})) == stem
    assert template.state(stem).read_bytes() == b"y" * 128
    assert store.env_state(template, env_digest({"K": "W"})) is None
    assert store.get(template.meta.key) is not None  # the template itself is still trusted


def test_a_changed_or_truncated_state_is_damaged(store_and_template: tuple[TemplateStore, Template]) -> None:
    store, template = store_and_template
    stem = _add(store, template, {"K": "V"})
    os.truncate(template.ram(stem), 10)
    with pytest.raises(Damaged, match="truncated"):
        store.env_state(template, env_digest({"K": "V"}))
    store.remove_env_state(template, env_digest({"K": "V"}))
    assert not [f for f in template.path.iterdir() if f.name.startswith(stem)]
    assert store.env_state(template, env_digest({"K": "V"})) is None


def test_at_most_a_few_states_are_kept_oldest_dropped(store_and_template: tuple[TemplateStore, Template]) -> None:
    store, template = store_and_template
    for i in range(MAX_ENV_STATES + 2):
        _add(store, template, {"K": str(i)})
        time.sleep(0.01)  # distinct mtimes
    kept = template.env_states()
    assert kept == [env_digest({"K": str(i)}) for i in range(2, MAX_ENV_STATES + 2)]
    left = {f.name.split(".")[0] for f in template.path.iterdir() if f.name.startswith("ready-env-")}
    assert left == {f"ready-env-{d}" for d in kept}


def test_cleanup_removes_what_an_env_maker_left_and_nothing_in_use(tmp_path: Path) -> None:
    """An interrupted maker's staging dir and the values file of one that never started go;
    a values file a maker may still be about to read stays."""
    import mvm

    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    layout.templates.mkdir(parents=True)
    staging = layout.templates / ".build-0123456789ab-env-x1"
    staging.mkdir()
    old, fresh = layout.templates / ".env-old.json", layout.templates / ".env-fresh.json"
    for values in (old, fresh):
        values.write_text('{"K": "V"}')
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    report = mvm.cleanup(layout)
    assert {Path(i.path) for i in report.items} == {staging, old}
    assert fresh.exists() and not old.exists() and not staging.exists()


def test_asking_whether_a_lock_is_held_neither_takes_nor_makes_it(tmp_path: Path) -> None:
    from filelock import FileLock

    from mvm._locks import held

    lock = tmp_path / ".abc.lock"
    assert not held(lock) and not lock.exists()  # a probe must not leave a lock file behind
    with FileLock(str(lock)):
        assert held(lock)
    assert not held(lock)


def test_cleanup_keeps_the_newest_images_of_each_architecture(tmp_path: Path) -> None:
    import mvm
    from mvm.builders.store import ImageStore, Manifest
    from mvm.spec import GuestSpec

    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    store = ImageStore(layout.images)

    def build(key: str, arch: str) -> Path:
        def make(staging: Path) -> Manifest:
            (staging / "rootfs.ext4").write_bytes(b"x")
            return Manifest(key=key, name="hello", frontend="toml", source={}, guest=GuestSpec(name="hello"),
                            arch=arch)  # type: ignore[arg-type]
        return store.publish(key, make).path

    old_x86, old_arm, new_x86, new_arm = (build(k * 32, a) for k, a in
                                          (("a", "x86_64"), ("b", "aarch64"), ("c", "x86_64"), ("d", "aarch64")))
    templates = TemplateStore(layout)
    for image_key, key in (("a" * 32, "t" * 32), ("c" * 32, "u" * 32)):  # one of an old image, one of a new
        staging = templates.root / f".build-{key}"
        staging.mkdir(parents=True)
        (staging / "ready.ram").write_bytes(b"r" * 8192)
        templates.publish(staging, TemplateMeta(key=key, image_key=image_key, shape=Shape(cpus=1, memory=512,
                          arch="x86_64"), kinds=["ready"], hotplug_slots=4, created_at=0.0, create_secs=0.0, files={}))
    report = mvm.cleanup(layout, dry_run=True, keep=1)
    assert {Path(i.path) for i in report.items if i.kind == "image"} == {old_x86, old_arm}
    assert any("of hello (aarch64) is unused" in i.reason for i in report.items)
    assert new_x86.exists() and new_arm.exists()
    # the old image's template goes with it, said so (not "an image that is gone": it is there), and its
    # size is what removing it frees, as `template rm` counts it
    [template] = [i for i in report.items if i.kind == "template"]
    assert template.reason == f"template of image {'a' * 12}, removed with it"
    assert template.bytes == templates.get("t" * 32).bytes_on_disk  # type: ignore[union-attr]
    assert any(n.startswith(f"kept: template {'u' * 12} of {'c' * 12}") for n in report.notes)


def test_cleanup_leaves_a_layer_a_build_holds_and_one_an_image_named_meanwhile(tmp_path: Path) -> None:
    """A build holds its package layer's lock until its image is published (which then names
    the layer): cleanup must not take the layer from under it, nor one named since it looked."""
    from filelock import FileLock

    import mvm
    from mvm.builders.store import ImageStore, Manifest
    from mvm.spec import GuestSpec

    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    for key in ("1" * 32, "2" * 32):
        (layout.layers / key).mkdir(parents=True)
    building, named_later = layout.layers / ("1" * 32), layout.layers / ("2" * 32)
    assert {Path(i.path) for i in mvm.cleanup(layout, dry_run=True).items} == {building, named_later}

    def make(staging: Path) -> Manifest:  # an image built from the second layer, after cleanup looked
        (staging / "rootfs.ext4").write_bytes(b"x")
        return Manifest(key="k" * 32, name="hello", frontend="toml", source={"layer": "2" * 32},
                        guest=GuestSpec(name="hello"))

    from mvm._api import cleanup as cleanup_module
    from mvm._api.models import CleanupItem
    looked = cleanup_module._unused_layers

    def published_meanwhile(*args: object) -> list[CleanupItem]:
        items = looked(*args)  # type: ignore[arg-type]
        ImageStore(layout.images).publish("k" * 32, make)
        return items

    with FileLock(str(layout.layers / f".{'1' * 32}.lock")), pytest.MonkeyPatch.context() as mp:
        mp.setattr(cleanup_module, "_unused_layers", published_meanwhile)
        report = mvm.cleanup(layout)
    assert [i for i in report.items if i.kind == "layer"] == []
    assert f"kept: package layer {'1' * 12} (a build is using it)" in report.notes
    assert f"kept: package layer {'2' * 12} (an image built since names it)" in report.notes
    assert building.is_dir() and named_later.is_dir()
    report = mvm.cleanup(layout)  # the build is over
    assert [Path(i.path) for i in report.items if i.kind == "layer"] == [building] and not building.exists()
    assert not (layout.layers / f".{'1' * 32}.lock").exists()  # a removed layer leaves no lock file


def test_a_removed_template_takes_its_lock_file_unless_a_maker_holds_it(tmp_path: Path) -> None:
    from filelock import FileLock

    store = TemplateStore(Layout(state=tmp_path / "state", cache=tmp_path / "cache"))
    for key in ("a" * 32, "b" * 32):
        store.dir(key).mkdir(parents=True)
        store.lock_path(key).touch()
    store.remove("a" * 32)
    assert not store.dir("a" * 32).exists() and not store.lock_path("a" * 32).exists()
    with FileLock(str(store.lock_path("b" * 32))):  # a maker replacing a damaged template
        store.remove("b" * 32)
        assert not store.dir("b" * 32).exists() and store.lock_path("b" * 32).exists()
