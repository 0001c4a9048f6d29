"""mvm: declarative microVMs. ``mvmctl`` is a thin layer over this API.

    import mvm
    vm = mvm.up("examples/hello", ports=["8080:8080"])
    print(vm.exec(["cat", "/etc/hostname"]).stdout)
    vm.down()
"""

from . import paths
from ._api import VM, BuildResult, ExecResult, build, down, get, ls, up
from ._volumes import volume_export, volume_ls, volume_rm
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .spec import GuestSpec, HealthCheck, Service, load_toml

__version__ = "0.1.0"

__all__ = [
    "VM",
    "BuildResult",
    "ExecResult",
    "GuestSpec",
    "HealthCheck",
    "Service",
    "build",
    "down",
    "get",
    "load_toml",
    "paths",
    "ls",
    "up",
    "volume_export",
    "volume_ls",
    "volume_rm",
    *_errors_all,
]
