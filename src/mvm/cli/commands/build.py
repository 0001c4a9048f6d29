"""mvmctl build."""

from __future__ import annotations

import typer

from ..options import Json, SpecPath


def build(path: SpecPath = ".", json: Json = False) -> None:
    """Build the image for a guest spec (mvm.toml), or find it in the cache.

    The image (kernel, initrd, rootfs.ext4, manifest.json) is stored by content: building an
    unchanged spec again is a cache hit that takes well under a second.

    [bold]Examples[/]
      mvmctl build examples/hello
      mvmctl build . --json
    """
    import mvm

    from .. import output

    with output.progress(f"building {path}") as prog:
        result = mvm.build(path, progress=prog)
    image = result.image
    if json:
        output.print_json({
            "name": image.name, "key": image.key, "path": str(image.path), "built": result.built,
            "seconds": round(result.seconds, 3), "manifest": image.manifest.model_dump(mode="json"),
        })
        return
    verb = "built" if result.built else "up to date (cached)"
    output.info(f"{image.name}: {verb}, image {image.key[:12]} in {result.seconds:.2f}s")
    output.out.print(str(image.path))


def register(app: typer.Typer) -> None:
    app.command()(build)
