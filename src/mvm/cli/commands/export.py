"""mvmctl export."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Arch, Env, Flake, Json, NixArg, OverrideInput, missing, nix_args


def export(
    target: Annotated[str, typer.Argument(metavar="NAME|PATH", help="A directory holding mvm.toml (built if "
                                          "needed), or an image from `mvmctl images` (name or key).")] = ".",
    kubevirt: Annotated[bool, typer.Option("--kubevirt", help="Export for KubeVirt (the only target so "
                                           "far).")] = False,
    out: Annotated[str, typer.Option("--output", "-o", metavar="DIR", help="Where to write vm.yaml and the "
                                     "OCI image.", show_default=False)] = "",
    image: Annotated[str | None, typer.Option("--image", metavar="REF", help="The image reference vm.yaml "
                                              "points at (where you will push it), e.g. "
                                              "registry.example.com/team/hello:1 (default: "
                                              "localhost:5000/NAME:<12 hex of the manifest digest>).",
                                              show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="The VirtualMachine's name "
                                             "(default: the guest's).", show_default=False)] = None,
    port: Annotated[list[int] | None, typer.Option("--port", "-p", metavar="PORT", help="A guest port the "
                                                   "Service exposes. Repeatable (default: the health "
                                                   "check's).", show_default=False)] = None,
    env: Env = None,
    arch: Arch = None,
    archive: Annotated[bool, typer.Option("--archive", help="Write one oci-archive tar instead of an OCI "
                                          "layout dir.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in DIR.")] = False,
    json: Json = False,
    flake: Flake = None,
    override_input: OverrideInput = None,
    nix_arg: NixArg = None,
) -> None:
    """Export an image to run on Kubernetes through KubeVirt: an OCI image with the kernel,
    initrd and root disk (a containerDisk with kernelBoot), and vm.yaml (a VirtualMachine,
    and a Service for the ports). Prints the `skopeo copy` and `kubectl apply` lines to run.

    The exported guest needs no mvm host: it takes its address by DHCP and writes its
    service logs and health transitions to the serial console. See docs/kubernetes.md for
    what maps to what, and what is not supported.

    \b
    Example:
      mvmctl export examples/hello --kubevirt -o out --image registry.example.com/hello:1
    """
    import mvm

    from .. import output

    if not kubevirt:
        raise missing("say which target: --kubevirt (e.g. mvmctl export . --kubevirt -o out)")
    if not out:
        raise missing("--output DIR is required (e.g. mvmctl export . --kubevirt -o out)")
    with output.progress(f"exporting {flake or target}") as prog:
        info = mvm.export_kubevirt(target, out=out, flake=flake, nix_args=nix_args(override_input, nix_arg),
                                   image_ref=image, name=name, ports=port or [], env=mvm.parse_env(env or []),
                                   arch=arch, archive=archive, force=force, progress=prog)
    if json:
        output.print_json(info)
        return
    output.info(f"wrote {info.vm_yaml} and {info.layout or info.archive} (image {info.image}, "
                f"from mvm image {info.image_key[:12]})")
    for note in info.notes:
        output.info(f"note: {note}")
    for dropped in info.dropped:
        output.info(f"[yellow]not exported[/]: health check {dropped}")
    output.info("next:")
    for line in info.commands:
        output.out.print(f"  {line}")


def register(app: typer.Typer) -> None:
    app.command()(export)
