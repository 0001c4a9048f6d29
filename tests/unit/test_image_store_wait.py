"""A build of an image another process is building says so, waits, and takes that one's."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mvm._locks import locked
from mvm.builders.store import ImageStore, Manifest
from mvm.spec import GuestSpec


def test_a_build_waiting_for_another_of_the_same_image_says_so_and_takes_its_image(tmp_path: Path) -> None:
    """Hands-on: `build` sat on "assembling the image" for the other build's 33 s, then said it
    had built it in that time."""
    store = ImageStore(tmp_path)
    key = "k" * 32
    made: list[str] = []

    def make(staging: Path) -> Manifest:
        made.append(threading.current_thread().name)
        (staging / "rootfs.ext4").write_bytes(b"x")
        return Manifest(key=key, name="x", frontend="toml", source={}, guest=GuestSpec.model_validate({"name": "x"}))

    holding, release = threading.Event(), threading.Event()

    def other_build() -> None:
        with locked(store.lock_path(key)):  # another mvmctl building the same image
            holding.set()
            release.wait(10)
            store.root.mkdir(exist_ok=True)
        store.publish(key, make)

    store.root.mkdir(parents=True, exist_ok=True)
    other = threading.Thread(target=other_build, name="other")
    other.start()
    holding.wait(10)
    said: list[float] = []
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    image = store.publish(key, make, on_wait=lambda: said.append(time.monotonic() - started))
    other.join(10)
    assert said and said[0] < 0.2  # said at once, not after the wait
    assert image.path.is_dir() and len(made) == 1  # built once, by whichever got the lock first
    assert store.publish(key, make, on_wait=lambda: said.append(-1.0)) == image and -1.0 not in said  # no wait
