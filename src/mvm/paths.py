"""Where mvm keeps things on the host. Names only: nothing here touches the disk.

``MVM_HOME`` overrides both roots (``$MVM_HOME/state`` and ``$MVM_HOME/cache``), which is
how tests and parallel users keep apart. ``MVM_CACHE`` overrides the cache root alone (so
several state dirs can share built images and the kernel), ``MVM_STATE`` the state root. Otherwise the XDG state and
cache dirs are used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _xdg_dir(kind: str) -> Path:
    import platformdirs

    if kind == "state":
        return Path(platformdirs.user_state_dir("mvm"))
    return Path(platformdirs.user_cache_dir("mvm"))


@dataclass(frozen=True)
class Layout:
    """The roots of mvm's on-disk state: VM runtime dirs, volumes, and caches."""

    state: Path
    cache: Path

    @classmethod
    def default(cls) -> Layout:
        home = os.environ.get("MVM_HOME")
        cache = os.environ.get("MVM_CACHE")
        state_dir = os.environ.get("MVM_STATE")
        if home:
            root = Path(home).expanduser().absolute()
            state, default_cache = root / "state", root / "cache"
        else:
            state, default_cache = _xdg_dir("state"), _xdg_dir("cache")
        if state_dir:
            state = Path(state_dir).expanduser().absolute()
        return cls(state=state, cache=Path(cache).expanduser().absolute() if cache else default_cache)

    @property
    def vms(self) -> Path:
        return self.state / "vms"

    def vm_dir(self, name: str) -> Path:
        """The VM's runtime dir. :class:`~mvm.errors.UsageError` for a ``name`` no VM can have
        (``down ../images`` removed the image store; ``down .locks``, every VM's lock file)."""
        from .errors import UsageError
        from .names import NAME_RE

        if not NAME_RE.fullmatch(name):
            raise UsageError(f"{name!r} is not a VM name: VM names are 1-63 characters of a-z, 0-9 and '-', "
                             "starting and ending with a letter or digit", hint="list VMs with `mvmctl ls`")
        return self.vms / name

    @property
    def volumes(self) -> Path:
        return self.state / "volumes"

    @property
    def retained_logs(self) -> Path:
        """Logs of VMs that were brought down, one dir per VM name (kept until ``cleanup``
        or a new ``up`` of the name)."""
        return self.state / "logs"

    @property
    def images(self) -> Path:
        return self.cache / "images"

    @property
    def layers(self) -> Path:
        """Package layers of mvm.toml images (see mvm.builders.layer)."""
        return self.cache / "layers"

    @property
    def templates(self) -> Path:
        """Saved machines that ``up`` restores (see mvm.runtime.templates)."""
        return self.cache / "templates"

    @property
    def kernels(self) -> Path:
        return self.cache / "kernels"

    @property
    def debs(self) -> Path:
        return self.cache / "debs"

    @property
    def probes(self) -> Path:
        return self.cache / "probes"


@dataclass(frozen=True)
class VMFiles:
    """The files of one VM's runtime dir. Short names keep unix socket paths under 108 bytes."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "vm.json"

    @property
    def lock(self) -> Path:
        """Beside the VM dirs, not in this one (see :meth:`mvm.runtime.registry.Registry.locked`)."""
        return self.root.parent / ".locks" / f"{self.root.name}.lock"

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    def control(self, index: int) -> Path:
        return self.root / f"c{index}.sock"

    def control_lock(self, index: int) -> Path:
        return self.root / f"c{index}.lock"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def events_log(self) -> Path:
        return self.root / "events.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def config_disk(self) -> Path:
        return self.root / "config.img"

    @property
    def volumes(self) -> Path:
        return self.root / "ro-volumes"

    @property
    def root_disk(self) -> Path:
        """This VM's own copy-on-write layer over its image's (or template's) root disk."""
        return self.root / "root.qcow2"

    @property
    def saved_state(self) -> Path:
        """The machine saved by ``suspend``."""
        return self.root / "suspended.state"

    @property
    def launch(self) -> Path:
        """How the machine was started (``resume`` starts it the same way)."""
        return self.root / "launch.json"
