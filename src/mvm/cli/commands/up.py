"""mvmctl up."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import (
    Arch,
    Env,
    Flake,
    Json,
    Memory,
    NixArg,
    OverrideInput,
    Ports,
    SpecPath,
    Volumes,
    WaitTimeout,
    complete_hypervisors,
    nix_args,
    wait_timeout,
)


def up(
    path: SpecPath = ".",
    name: Annotated[str | None, typer.Option("--name", "-n", metavar="NAME", help="VM name (default: the spec's name).",
                                             show_default=False)] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", metavar="N", help="vCPUs (default: the spec's, else 1).",
                                             show_default=False)] = None,
    memory: Annotated[int | None, Memory("the spec's, else 512")] = None,
    port: Ports = None,
    env: Env = None,
    volume: Volumes = None,
    hypervisor: Annotated[str, typer.Option(
        "--hypervisor", metavar="auto|qemu-kvm|qemu-tcg", autocompletion=complete_hypervisors,
                        help="auto (KVM only if a probe proves it boots, else TCG), qemu-kvm or qemu-tcg."
    )] = "auto",
    wait: Annotated[bool, typer.Option("--wait", help="Return only once every service has started and every "
                                             "health check is healthy; fail at once if a service fails.")] = False,
    log_limit: Annotated[int | None, typer.Option("--log-limit", metavar="MIB", help="The most the VM's console "
                                                  "and service logs take on this host; older output is dropped "
                                                  "first (default: the spec's logLimitMb, else 64).",
                                                  show_default=False)] = None,
    cold: Annotated[bool, typer.Option("--cold", help="Boot, even where a saved template could be restored "
                                       "(see `mvmctl template --help`).")] = False,
    timeout: WaitTimeout = None,
    json: Json = False,
    arch: Arch = None,
    flake: Flake = None,
    override_input: OverrideInput = None,
    nix_arg: NixArg = None,
) -> None:
    """Build if needed, start the VM in the background, and return once its agent answers.

    Where a template of the image and shape exists, the VM is restored from it in well under
    a second instead of booting (see `mvmctl template --help`; --cold boots). The root
    filesystem is the VM's own copy-on-write layer; the cached image is never changed.
    On any failure (bad port, boot timeout, Ctrl-C) nothing is left behind, except one: when
    --wait gives up on health, the VM is kept running for inspection (the error says so).

    
    Examples:
      mvmctl up examples/hello -p 8080:8080
      mvmctl up . --name api2 -p 127.0.0.1:9000:8080 -e LOG_LEVEL=debug --wait
      mvmctl up . -v ./config:/mnt/config -v ./data:/mnt/data:1024
      mvmctl up --flake . --cpus 2 --memory 1024 -p 8080:8080
      mvmctl up examples/hello --arch aarch64 -p 8080:8080   # emulated on an x86_64 host
    """
    import mvm

    from .. import output

    seconds = wait_timeout(wait, timeout)
    with output.json_of_a_vm_left_running(json), output.progress("starting") as prog:
        vm = mvm.up(path, flake=flake, nix_args=nix_args(override_input, nix_arg), name=name,
                    cpus=cpus, memory=memory, ports=port or [], env=env or [], volumes=volume or [],
                    hypervisor=hypervisor, wait=wait, wait_timeout=seconds, progress=prog, cold=cold,
                    log_limit_mb=log_limit, arch=arch)
    info = vm.info(ask_guest=json)  # only --json prints health
    if json:
        output.print_json(info)
        return
    how = "restored" if info.start == "restored" else "booted"
    output.info(
        f"[green]{info.name}[/] is running "
        f"({how}; {info.accel}, {info.arch}, {info.cpus} vCPU, {output.mib(info.memory)})"
        + ((" and healthy" if info.checks else " with its services started" if info.services else "")
           if wait else "")
    )
    if info.emulated:
        output.info(f"note: {info.emulated}")
    if info.start_warning:
        output.info(f"[yellow]warning[/]: booted cold: {info.start_reason}")
    for p in info.ports:
        scheme = "http://" if p.proto == "tcp" else ""
        output.out.print(f"{scheme}{p.host_ip}:{p.host_port} -> guest {p.guest_port}/{p.proto}")
    for v in info.volumes:
        what = f"volume {v.volume}, {output.mib(v.size_mb)}" if v.volume else v.mode
        output.out.print(f"{v.host} -> guest {v.guest} ({what})")
    output.info(f"logs: mvmctl logs {info.name} -f    stop: mvmctl down {info.name}")


def register(app: typer.Typer) -> None:
    app.command()(up)
