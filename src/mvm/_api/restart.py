"""``restart``: down, then up again with what the VM was started with.

The same image, name, size, ports (a port picked for ``-p GUEST`` is asked for again by
number), volumes, ``-e`` values (read back from the VM's boot config), ``--hypervisor`` and
``--log-limit``. The image must
still be in the store: ``cleanup`` keeps images that VMs use.
"""

from __future__ import annotations

import shlex

from .._proc import DEFAULT_RUNNER, Runner
from ..backends.base import PortForward
from ..builders.store import ImageStore
from ..errors import MvmError, StateError, VMError
from ..names import HEALTH_TIMEOUT, host_arch
from ..paths import Layout
from ..runtime.bootconfig import read_config_disk
from ..runtime.registry import Registry, VMRecord
from ..volumes.args import parse_volumes
from .down import down
from .machines import backend_for
from .options import check_host_cpus, check_host_memory
from .progress import Progress
from .templates import COLD_FORCED
from .up import up
from .vm import VM
from .volume_attach import check_readonly_source


def restart(name: str, *, wait: bool = False, wait_timeout: float = HEALTH_TIMEOUT, layout: Layout | None = None,
            runner: Runner = DEFAULT_RUNNER, progress: Progress | None = None) -> VM:
    layout = layout or Layout.default()
    registry = Registry(layout)
    record = registry.load(name)
    if record.phase == "suspended":  # restart is down + up: the saved machine would be thrown away unasked
        raise VMError(name, f"VM {name!r} is suspended: restarting it would discard its saved state",
                      hint=f"`mvmctl resume {name}` brings it back as it was (restart it after that if you "
                      f"want); to discard the saved state: `mvmctl down {name}`, then `{_up_again(record)}`")
    image = ImageStore(layout.images).get(record.image_key)
    if image is None:
        raise StateError(f"the image of {name!r} ({record.image_key[:12]}) is no longer in the store",
                         hint=f"start it from its spec again: `mvmctl down {name}`, then `{_up_again(record)}`")
    config = read_config_disk(registry.files(name).config_disk)
    env = config.env if config is not None else {}
    ports = [PortForward(p.host_port, p.guest_port, p.host_ip, p.proto) for p in record.ports]
    volumes = [v.as_arg() for v in record.volumes]
    # before `down`: a shape this host cannot run (a VM made elsewhere, or by an older mvm)
    # must not cost the VM
    unshaped = _up_again(record, shape=False)
    check_host_cpus(record.cpus, f"{name} has {record.cpus} vCPUs",
                    hint=f"restart keeps the shape: `mvmctl down {name}`, then `{unshaped} --cpus N`")
    check_host_memory(record.memory, f"{name} has {record.memory} MiB of memory",
                      hint=f"restart keeps the shape: `mvmctl down {name}`, then `{unshaped} --memory N`")
    for arg in parse_volumes(volumes):  # a read-only volume's directory moved away: before `down`, too
        if not arg.writable:
            check_readonly_source(arg)
    down(name, layout=layout, runner=runner)
    try:
        return up(image=image, name=name, cpus=record.cpus, memory=record.memory, ports=ports, env=env,
                  volumes=volumes, hypervisor=record.hypervisor, log_limit_mb=record.log_limit_mb, wait=wait,
                  cold=record.start_reason == COLD_FORCED,
                  wait_timeout=wait_timeout, layout=layout, runner=runner, progress=progress,
                  backend=backend_for(record, runner))
    except MvmError as exc:  # after `down`: the VM is gone, and how it was started must not be
        if registry.files(name).root.is_dir():  # `up --wait` keeps an unhealthy VM for inspection
            raise
        again = _up_again(record) + "".join(f" -e {k}=..." for k in sorted(env))
        exc.hint = (f"{exc.hint}; " if exc.hint else "") + f"{name} was stopped and is gone: once that is " \
            f"fixed, start it again with `{again}`" + (" (its -e values as before)" if env else "")
        raise


def _up_again(record: VMRecord, *, shape: bool = True) -> str:
    """The `up` that starts the VM afresh as it was started: its spec (or flake) and
    architecture, name, ports, volumes and (``shape``) its vCPUs, memory and the options
    `restart` keeps (`--hypervisor`, `--log-limit`, `--cold`)."""
    flake = record.frontend == "nix"
    words = ["mvmctl up", "--flake" if flake else "", shlex.quote(record.source or "."), "--name", record.name]
    if record.arch != host_arch() and not (flake and "#" in record.source):  # a flake's #ATTR names it
        words += ["--arch", record.arch]
    if shape:
        words += [f"--cpus {record.cpus}", f"--memory {record.memory}"]
        words += [f"--hypervisor {record.hypervisor}"] if record.hypervisor != "auto" else []
        words += [f"--log-limit {record.log_limit_mb}"] if record.log_limit_mb is not None else []
        words += ["--cold"] if record.start_reason == COLD_FORCED else []
    words += [f"-p {p.host_ip + ':' if p.host_ip != '127.0.0.1' else ''}{p.host_port}:{p.guest_port}/{p.proto}"
              for p in record.ports]
    words += [f"-v {shlex.quote(v.as_arg())}" for v in record.volumes]
    return " ".join(w for w in words if w)
