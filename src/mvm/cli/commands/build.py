"""mvmctl build."""

from __future__ import annotations

from typing import Annotated

import typer

from ..options import Arch, Flake, Json, NixArg, OverrideInput, SpecPath, nix_args


def build(
    path: SpecPath = ".",
    pull: Annotated[bool, typer.Option("--pull", help="Refresh the Debian package layer from the mirrors "
                                       "(newer packages). Without it the cached layer is reused, which also "
                                       "works offline.")] = False,
    json: Json = False,
    arch: Arch = None,
    flake: Flake = None,
    override_input: OverrideInput = None,
    nix_arg: NixArg = None,
) -> None:
    """Build the image for a guest spec (mvm.toml) or a flake's mkGuest output, or find it in the cache.

    The image (kernel, initrd, rootfs.ext4, manifest.json) is stored by content: building an
    unchanged spec again is a cache hit that takes well under a second. For mvm.toml, the
    packages are installed once into a package layer that every image with the same
    packages shares; changing a service, a health check or a shipped file re-assembles the
    image from it in about a second. With --flake, nix builds the image and its output
    path is the cache key.

    
    Examples:
      mvmctl build examples/hello
      mvmctl build . --json
      mvmctl build examples/hello --arch aarch64
      mvmctl build --flake .
      mvmctl build --flake .#api --override-input nixpkgs path:../nixpkgs
    """
    import mvm

    from .. import output

    extra = nix_args(override_input, nix_arg)
    with output.progress(f"building {flake or path}") as prog:
        result = mvm.build(path, flake=flake, nix_args=extra, pull=pull, arch=arch, progress=prog)
    if json:
        output.print_json(result)
        return
    verb = "built" if result.built else "up to date (cached)"
    output.info(f"{result.name}: {verb}, image {result.key[:12]} ({result.arch}) in {result.seconds:.2f}s")
    output.out.print(result.path)


def register(app: typer.Typer) -> None:
    app.command()(build)
