"""Fixtures the unit tests share: a state layout in a temporary dir, the in-memory fake
backend registered as ``fake``, and a tiny image. Unit tests never start a background
template maker (MVM_TEMPLATES=restore: a template is restored when there is one, never made
behind the test's back)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm import backends
from mvm.backends.fake import FakeBackend
from mvm.builders.store import Image, Manifest
from mvm.paths import Layout
from mvm.spec import GuestSpec, HealthCheck, Service


@pytest.fixture(autouse=True)
def _no_background_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_TEMPLATES", "restore")


@pytest.fixture()
def layout(tmp_path: Path) -> Layout:
    return Layout(state=tmp_path / "state", cache=tmp_path / "cache")


@pytest.fixture()
def fake() -> Iterator[FakeBackend]:
    backend = FakeBackend()
    backends.register("fake", lambda runner: backend)
    yield backend
    for machine in backend.machines.values():
        if machine.running:
            machine.guest.stop()
    backends.unregister("fake")


@pytest.fixture()
def image(tmp_path: Path) -> Image:
    path = tmp_path / "image"
    path.mkdir()
    for name in ("vmlinux", "initrd", "rootfs.ext4"):
        (path / name).write_bytes(b"x")
    guest = GuestSpec(name="web", services={"svc": Service(command="true")},
                      health_checks={"check": HealthCheck(health_cmd="true")})
    return Image(path, Manifest(key="k" * 32, name="web", frontend="toml", source={"path": "/x/mvm.toml"},
                                guest=guest))
