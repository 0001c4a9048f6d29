"""The package layer of an ``mvm.toml`` image: Debian packages plus the guest agent, built
once by mmdebstrap and reused by every image with the same package list.

Building a root filesystem is two steps of very different cost. mmdebstrap resolving,
unpacking and configuring packages takes tens of seconds; adding a guest's own files, its
services and its users takes well under one. So the first is cached here, keyed by what
decides its contents (package list, architecture, suite, the apt sources, the agent), and
an image is the layer's ext4 file copied and finished by :mod:`.assemble` with debugfs.

A build holds the layer's lock from finding (or building) it until its image is published:
``cleanup`` removes a layer only under that lock and only when no image names it, so it
cannot take one from under a build whose image does not name it yet.

The layer is refreshed only on request (``mvmctl build --pull``): a cached layer keeps an
image's packages stable, and lets builds work offline. Its ``id`` is the digest of dpkg's
status file, i.e. of the package versions it holds, and is part of every image key, so a
pulled layer with newer packages makes new images rather than reusing old ones.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .._atomic import remove_tree, replace_tree, write_json_atomic
from .._locks import Busy, locked
from .._proc import Runner, require_tool
from ..errors import BuildError, SpecError
from ..paths import Layout
from . import arches, guestfiles
from .aptsources import AptSources, proxy_options

LAYER_VERSION = "layer-1"
LAYER_JSON = "layer.json"
LAYER_SCHEMA = 1
IMAGE = "rootfs.ext4"
#: Always installed: the agent's Python. The rest of the Essential set comes with the variant.
BASE_PACKAGES = ["python3"]
TRIM = [
    "usr/share/doc/*", "usr/share/man/*", "usr/share/locale/*", "usr/share/info/*",
    "usr/share/lintian/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*", "var/log/*",
]


@dataclass(frozen=True)
class Layer:
    path: Path
    key: str
    id: str  #: digest of the package versions installed (dpkg's status file)

    @property
    def image(self) -> Path:
        return self.path / IMAGE


def layer_key(packages: list[str], arch: str, sources: AptSources) -> str:
    parts = {"version": LAYER_VERSION, "packages": sorted(set(packages)), "arch": arch,
             "suite": sources.suite, "mirrors": sources.mirrors, "agent": guestfiles.agent_digest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def customize_script(overlay: Path, out: Path, status: Path) -> str:
    q = shlex.quote
    trims = " ".join(f'"$root"/{pattern}' for pattern in TRIM)
    return f"""#!/bin/sh
set -eu
root="$1"
cp -a {q(str(overlay))}/. "$root"/
rm -rf {trims}
chroot "$root" python3 -m compileall -q -j0 /usr/lib/mvm >/dev/null
cp "$root/var/lib/dpkg/status" {q(str(status))}
# A non-recursive bind mount shows the tree without the proc/sys/dev mounted over it.
view=$(mktemp -d)
trap 'umount "$view" 2>/dev/null; rmdir "$view"' EXIT
mount --bind "$root" "$view"
size=$(du -smx "$view" | cut -f1)
size=$((size + size / 5 + 64))
mkfs.ext4 -q -F -T default -O ^has_journal -L mvm-root -E root_owner=0:0 -d "$view" {q(str(out))} "${{size}}M"
"""


def apt_errors(output: str) -> str | None:
    """The apt complaint in mmdebstrap's output, e.g. an unknown package name."""
    errors = [ln.strip() for ln in output.splitlines() if ln.lstrip().startswith("E:")]
    markers = ("Unable to locate package", "has no installation candidate")
    unknown = [e.removeprefix("E: ") for e in errors if any(m in e for m in markers)]
    return "; ".join(dict.fromkeys(unknown)) if unknown else None


def unmount_below(path: Path, runner: Runner) -> None:
    """Detach anything still mounted under ``path`` (an interrupted mmdebstrap's chroot
    mounts), so removing the temp dir can never reach into a mounted /proc or /dev."""
    try:
        with open("/proc/self/mounts") as f:
            targets = [line.split()[1] for line in f]
    except OSError:
        return
    prefix = str(path.resolve()) + "/"
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        runner.run(["umount", "--lazy", target], desc=f"unmounting {target}", ok_codes=(0, 1, 32))


def _read(path: Path) -> Layer | None:
    try:
        doc = json.loads((path / LAYER_JSON).read_text())
        if doc.get("schema_version") == LAYER_SCHEMA and (path / IMAGE).is_file():
            return Layer(path, str(doc["key"]), str(doc["id"]))
    except (OSError, ValueError, KeyError):
        pass
    return None


def miss_reason(root: Path, key: str, packages: list[str], arch: str, sources: AptSources) -> str | None:
    """Why no cached layer fits, when one for the same packages exists: a build that
    installs packages again (a minute or more for a foreign architecture) should not look
    like a cache that forgot. None when no other cached layer has these packages for ``arch``."""
    for doc_path in sorted(root.glob(f"*/{LAYER_JSON}")):
        if doc_path.parent.name == key:
            continue
        try:
            doc = json.loads(doc_path.read_text())
        except (OSError, ValueError):
            continue
        if sorted(doc.get("packages") or []) != sorted(packages) or doc.get("arch") != arch:
            continue
        shown = arches.from_debian(arch)  # the user's word for it (x86_64, not amd64)
        if doc.get("suite") != sources.suite or doc.get("mirrors") != sources.mirrors:
            return (f"the cached {shown} package layer with these packages came from other apt sources "
                    f"(Debian {doc.get('suite')}); installing them again from {sources.suite}")
        return (f"the cached {shown} package layer with these packages was made by another version of mvm "
                "(its guest agent or layer format changed); installing them again (`mvmctl cleanup` "
                "removes the old layer once no image uses it)")
    return None


@contextmanager
def held_layer(
    packages: list[str],
    *,
    arch: str,
    sources: AptSources,
    layout: Layout,
    runner: Runner,
    pull: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
    on_line: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] = lambda _: None,
) -> Iterator[Layer]:
    """The cached layer for ``packages`` (built now if missing, or rebuilt with ``pull``),
    its lock held until the block ends (see the module docstring)."""
    wanted = list(dict.fromkeys(BASE_PACKAGES + packages))
    key = layer_key(wanted, arch, sources)
    root = layout.layers
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{key}.lock"):
        found = _read(root / key)
        if found is not None and not pull:
            yield found
            return
        why = "--pull: rebuilding it with the mirrors' current packages" if found is not None else \
            miss_reason(root, key, wanted, arch, sources)
        for note in (why, arches.install_note(arches.from_debian(arch))):
            if note:  # its own line: in the stage it would crowd out the elapsed time on a terminal
                on_note(note)
        on_stage(f"installing packages ({', '.join(wanted)}) with mmdebstrap")
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root))
        try:
            layer_id = _build(staging, wanted, arch=arch, sources=sources, layout=layout, runner=runner,
                              on_line=on_line)
            write_json_atomic(staging / LAYER_JSON, {
                "schema_version": LAYER_SCHEMA, "key": key, "id": layer_id, "packages": wanted, "arch": arch,
                "suite": sources.suite, "mirrors": sources.mirrors, "agent": guestfiles.agent_digest(),
                "created_at": time.time(),
            })
            unmount_below(root / key, runner)  # a --pull's old layer (we hold its lock): nothing mounted in it
            replace_tree(staging, root / key)
        except BaseException:
            unmount_below(staging, runner)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        yield Layer(root / key, key, layer_id)


def remove_unused(layout: Layout, key: str, named: Callable[[str], bool], runner: Runner) -> str | None:
    """Remove layer ``key``, unless a build holds it or an image names it (``named``, asked
    under its lock): None if removed, else why not."""
    path = layout.layers / key
    try:
        with locked(layout.layers / f".{key}.lock", wait=False):
            if named(key):
                return "an image built since names it"
            unmount_below(path, runner)
            remove_tree(path, ignore_errors=True)
            (layout.layers / f".{key}.lock").unlink(missing_ok=True)  # held: see Registry.remove
    except Busy:
        return "a build is using it"
    return None


def _build(staging: Path, packages: list[str], *, arch: str, sources: AptSources, layout: Layout,
           runner: Runner, on_line: Callable[[str], None] | None) -> str:
    require_tool("mmdebstrap")
    require_tool("mkfs.ext4")
    arches.check_can_install(arches.from_debian(arch))
    debs = layout.debs / arch
    debs.mkdir(parents=True, exist_ok=True)
    work = staging / ".work"
    overlay = work / "overlay"
    guestfiles.stage_agent(overlay, python="/usr/bin/python3")
    script = work / "customize.sh"
    status = work / "dpkg-status"
    script.write_text(customize_script(overlay, staging / IMAGE, status))
    argv = [
        "mmdebstrap",
        "--variant=essential",
        f"--architectures={arch}",
        f"--include={','.join(packages)}",
        "--format=null",
        "--aptopt=Acquire::Languages \"none\"",
        *(f"--aptopt={opt}" for opt in proxy_options(runner)),
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--skip=essential/unlink",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
        f"--setup-hook=sync-in {shlex.quote(str(debs))} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(debs))}",
        f"--customize-hook=sh {shlex.quote(str(script))} \"$1\"",
        sources.suite,
        "/dev/null",
        *sources.mirrors,
    ]
    try:
        runner.run(argv, desc="installing packages with mmdebstrap", env={"TMPDIR": str(work)},
                   on_line=on_line, error=BuildError,
                   hint="offline? a cached package layer needs no network: build without --pull")
    except BuildError as exc:
        complaint = apt_errors(exc.output or "")
        if complaint:
            raise SpecError(
                f"apt could not install the packages: {complaint}",
                hint="check the names in `packages` (apt-cache search NAME); "
                f"packages come from Debian {sources.suite}",
            ) from None
        raise
    finally:
        unmount_below(work, runner)
    layer_id = hashlib.sha256(status.read_bytes()).hexdigest()[:32]
    shutil.rmtree(work, ignore_errors=True)
    return layer_id
