"""mvm: declarative microVMs. ``mvmctl`` is a thin layer over this API.

    import mvm
    vm = mvm.up("examples/hello", ports=["8080:8080"])
    print(vm.exec(["cat", "/etc/hostname"]).stdout)
    vm.down()

Results are typed models (:class:`VMInfo`, :class:`GuestStatus`, :class:`VolumeInfo`, ...);
errors are :class:`MvmError` subclasses, each with a ``hint``.

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
    from ._api import dev
    from ._api.build import build
    from ._api.cleanup import cleanup
    from ._api.console import ConsoleSession
    from ._api.copy import cp
    from ._api.doctor import doctor
    from ._api.down import down
    from ._api.export import export_kubevirt
    from ._api.images import images, rmi
    from ._api.listing import LogLine, get, logs, ls, vm_names
    from ._api.models import (
        ArchCheck,
        BackendCheck,
        BuildResult,
        CheckStatus,
        CleanupItem,
        CleanupReport,
        DiskCheck,
        DoctorReport,
        DownResult,
        ExecResult,
        ExportInfo,
        GuestStatus,
        ImageInfo,
        IsolationCheck,
        MountInfo,
        PortInfo,
        ServiceStatus,
        ServiceUsage,
        TemplateInfo,
        ToolCheck,
        VMDetails,
        VMInfo,
        VMStatus,
        VMUsage,
        VolumeExport,
        VolumeInfo,
    )
    from ._api.options import parse_env, parse_since
    from ._api.stats import stats
    from ._api.templates import template_create, template_rm
    from ._api.templates import templates_list as templates
    from ._api.up import up
    from ._api.vm import VM
    from ._api.volumes import volume_export, volume_info, volume_ls, volume_rm
    from .names import HEALTH_TIMEOUT
    from .spec import GuestSpec, HealthCheck, Service, load_toml

__version__ = "0.1.0"

_LAZY = {
    "build": "._api.build", "up": "._api.up", "down": "._api.down", "get": "._api.listing", "vm_names": "._api.listing",
    "ls": "._api.listing", "logs": "._api.listing", "cleanup": "._api.cleanup", "doctor": "._api.doctor",
    "VM": "._api.vm",
    "parse_since": "._api.options", "parse_env": "._api.options", "cp": "._api.copy", "ConsoleSession": "._api.console",
    "images": "._api.images", "rmi": "._api.images", "stats": "._api.stats",
    "template_create": "._api.templates", "template_rm": "._api.templates", "export_kubevirt": "._api.export",
    "volume_export": "._api.volumes", "volume_info": "._api.volumes", "volume_ls": "._api.volumes",
    "volume_rm": "._api.volumes",
    "VMStatus": "._api.models", "LogLine": "._api.listing",
    "GuestSpec": ".spec", "HealthCheck": ".spec", "Service": ".spec", "load_toml": ".spec",
    "HEALTH_TIMEOUT": ".names",
}
_MODELS = ("ArchCheck", "BackendCheck", "BuildResult", "CheckStatus", "CleanupItem", "CleanupReport", "DiskCheck",
           "DoctorReport", "DownResult", "ExecResult", "ExportInfo", "GuestStatus", "ImageInfo", "IsolationCheck",
           "MountInfo", "PortInfo", "ServiceStatus", "ServiceUsage", "TemplateInfo", "ToolCheck", "VMDetails",
           "VMInfo", "VMUsage", "VolumeExport", "VolumeInfo")
_LAZY.update(dict.fromkeys(_MODELS, "._api.models"))


def __getattr__(name: str) -> Any:
    if name == "templates":
        value: Any = import_module("._api.templates", __name__).templates_list
        globals()[name] = value
        return value
    if name == "dev":  # a namespace: mvm.dev.boot_vm(...), mvm.dev.run_on_host(...)
        value = import_module("._api.dev", __name__)
    else:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'mvm' has no attribute {name!r}")
        value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """What ``dir(mvm)`` and ``help(mvm)`` see: the public names too, not only those loaded yet
    (``help(mvm)`` listed no function but ``__getattr__``)."""
    return sorted(set(globals()) | set(__all__))


# A literal, for the type checker and linters; tests/unit/test_public_api.py checks that it
# names what the lazy loader gives and the block above imports.
__all__ = [  # the errors are appended below
    "build", "up", "down", "get", "vm_names", "ls", "logs", "cleanup", "doctor", "dev", "VM", "ConsoleSession",
    "images", "rmi", "parse_since", "parse_env", "cp", "stats", "template_create", "template_rm", "templates",
    "export_kubevirt",
    "volume_export", "volume_info", "volume_ls", "volume_rm",
    "ArchCheck", "BackendCheck", "BuildResult", "CheckStatus", "CleanupItem", "CleanupReport", "DiskCheck",
    "DoctorReport", "DownResult", "ExecResult", "ExportInfo", "GuestStatus", "ImageInfo", "IsolationCheck",
    "MountInfo", "PortInfo", "ServiceStatus", "ServiceUsage", "TemplateInfo", "ToolCheck", "VMDetails",
    "VMInfo", "VMUsage", "VolumeExport", "VolumeInfo", "VMStatus", "LogLine",
    "GuestSpec", "HealthCheck", "Service", "load_toml",
    "HEALTH_TIMEOUT",
    "paths",
]
__all__ += _errors_all
