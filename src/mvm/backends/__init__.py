"""Hypervisor backends, by name: the one place that maps ``vm.json``'s ``backend`` to code.

Backends are imported on first use, so commands that never touch a machine (``ls`` of an
empty registry, ``--help``) do not pay for QEMU's module. :func:`register` adds a backend
under a new name (the unit tests register :class:`~mvm.backends.fake.FakeBackend` this way).
"""

from __future__ import annotations

from collections.abc import Callable

from .._proc import DEFAULT_RUNNER, Runner
from ..errors import UsageError
from .base import Backend

Factory = Callable[[Runner], Backend]


def _qemu(runner: Runner) -> Backend:
    from .qemu import QemuBackend

    return QemuBackend(runner)


#: The backend of a VM whose record says none (or cannot be read), and of ``up`` by default.
DEFAULT = "qemu"
_FACTORIES: dict[str, Factory] = {DEFAULT: _qemu}


def get(name: str, runner: Runner = DEFAULT_RUNNER) -> Backend:
    """The backend called ``name``, with ``runner`` for the processes it starts."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise UsageError(f"unknown backend {name!r}", hint=f"this mvm has: {', '.join(sorted(_FACTORIES))}")
    return factory(runner)


def names() -> list[str]:
    """The backends this mvm has (the registered ones included)."""
    return sorted(_FACTORIES)


def register(name: str, factory: Factory) -> None:
    _FACTORIES[name] = factory


def unregister(name: str) -> None:
    _FACTORIES.pop(name, None)
