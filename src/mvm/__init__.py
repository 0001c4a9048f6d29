"""mvm: declarative microVMs. ``mvmctl`` is a thin layer over this API.

    import mvm
    vm = mvm.up("examples/hello", ports=["8080:8080"])
    print(vm.exec(["cat", "/etc/hostname"]).stdout)
    vm.down()

Names are imported on first use (PEP 562), so ``mvmctl exec`` and ``mvmctl ls`` do not pay
for the spec models and builders they never touch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import paths
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

if TYPE_CHECKING:
    from ._api.core import VM, BuildResult, ExecResult, build, down, get, ls, up
    from ._api.volumes import volume_export, volume_ls, volume_rm
    from .spec import GuestSpec, HealthCheck, Service, load_toml

__version__ = "0.1.0"

_LAZY = {
    "VM": "._api.core", "BuildResult": "._api.core", "ExecResult": "._api.core", "build": "._api.core",
    "down": "._api.core", "get": "._api.core", "ls": "._api.core", "up": "._api.core",
    "volume_export": "._api.volumes", "volume_ls": "._api.volumes", "volume_rm": "._api.volumes",
    "GuestSpec": ".spec", "HealthCheck": ".spec", "Service": ".spec", "load_toml": ".spec",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mvm' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [  # the errors are appended below
    "VM", "BuildResult", "ExecResult", "build", "down", "get", "ls", "up",
    "volume_export", "volume_ls", "volume_rm",
    "GuestSpec", "HealthCheck", "Service", "load_toml",
    "paths",
]
__all__ += _errors_all
