"""The Nix front end: a flake output made by ``mkGuest`` -> an image in mvm's store.

``mvmctl build --flake REF[#ATTR]`` runs in two steps:

1. ``nix eval`` of the output's store path (fast: no build). The image store key is a
   digest of that path, so an unchanged flake is a cache hit after one evaluation, even if
   ``nix-collect-garbage`` has since removed the build from ``/nix/store``.
2. On a miss, ``nix build`` (its progress streamed line by line), then the output's files
   are hard-linked (or copied) into the image store next to a manifest that records the
   flake reference and the output path. The image then boots exactly like one from
   ``mvm.toml``.

Nix's errors are condensed by :mod:`mvm.builders.nixerrors`. The flags that enable flakes are
passed on the command line, so a stock Nix (e.g. Debian's ``nix-bin``) needs no config. Who
nix builds as stays nix.conf's to say: as root on a Nix whose build users do not exist
(Debian's ``nix-bin`` alone creates no ``nixbld`` group), every build fails, and mvm says
why (``doctor`` before, the build's error after) rather than building as root behind the
user's back: a builder running as root owns the store it builds into.
"""

from __future__ import annotations

import grp
import hashlib
import json
import logging
import os
import platform
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._proc import Runner, require_tool
from ..errors import BuildError, CommandFailed, MvmError, SpecError, UsageError
from ..names import host_arch
from ..paths import Layout
from ..spec import INPUT, GuestSpec, describe_error
from . import arches, nixerrors
from .store import WAITING_FOR_ANOTHER_BUILD, Image, ImageStore, Manifest, link_or_copy

log = logging.getLogger(__name__)

BUILDER_VERSION = "nix-1"
#: Always passed: flakes work without touching nix.conf.
NIX_FLAGS = ["--extra-experimental-features", "nix-command flakes"]
#: guest.json keys the Nix front end adds on top of GuestSpec's (and the free-form packages).
NIX_GUEST_KEYS = ("schema_version", "frontend", "path", "packages")


#: The nix.conf line that lets root build without build users (as root: the dev VM, and
#: ``mvmctl dev`` on such a host, where the user runs nix by hand).
NO_BUILD_USERS = "build-users-group ="


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def root_without_build_users() -> bool:
    """Root, and no ``nixbld`` group: nix's default build users do not exist."""
    return os.geteuid() == 0 and not group_exists("nixbld")


def missing_build_group(nix: str, runner: Runner) -> str | None:
    """As root: the build users' group nix is configured with (nix.conf, NIX_CONFIG) when it
    does not exist, so that every build would fail; None when it exists, is unset, or mvm is
    not root (a daemon or the user builds then)."""
    if os.geteuid() != 0:
        return None
    try:
        shown = runner.run([nix, *NIX_FLAGS, "show-config"], desc="asking nix for its settings").output
    except MvmError:
        return None
    found = re.search(r"^build-users-group = (\S*)$", shown, re.M)
    group = found[1] if found else ""
    return group if group and not group_exists(group) else None


def config_env(environ: Mapping[str, str], *lines: str) -> dict[str, str]:
    """``NIX_CONFIG`` for a nix run: the caller's, then ``lines``."""
    return {"NIX_CONFIG": "\n".join([*filter(None, [environ.get("NIX_CONFIG")]), *lines])}


@dataclass(frozen=True)
class FlakeRef:
    """``URL#ATTR`` as given, split; ``attr`` defaults to the host's default package."""

    given: str
    url: str
    attr: str

    @property
    def installable(self) -> str:
        return f"{self.url}#{self.attr}"


def host_system() -> str:
    """Nix's name for this machine's platform, e.g. ``x86_64-linux``."""
    return f"{host_arch()}-{platform.system().lower()}"


def parse_ref(ref: str, system: str | None = None) -> FlakeRef:
    if not ref.strip():
        raise UsageError("--flake needs a flake reference", hint="e.g. --flake . or --flake .#myguest")
    url, _, attr = ref.partition("#")
    return FlakeRef(ref, url or ".", attr or f"packages.{system or host_system()}.default")


def _flake_above(path: Path) -> bool:
    """Whether nix finds a flake.nix for a path: in it, or above it up to the top of its git
    repository (nix looks upwards as far as that)."""
    for here in (path, *path.parents):
        if (here / "flake.nix").is_file():
            return True
        if (here / ".git").exists():
            return False
    return False


def check_local(url: str) -> None:
    """A flake given as a local path that holds none, or as a bare word naming a directory
    here, said in mvm's words: nix looked the word up in its registry online ("unable to
    download ... flake-registry.json") and reported a missing path relative to flake.nix."""
    if "?" in url:
        return
    if url.startswith((".", "/", "~", "path:")):
        path = Path(url.removeprefix("path:")).expanduser()
        if not path.exists():
            raise UsageError(f"--flake {url}: {path} does not exist",
                             hint="give the directory that holds flake.nix, e.g. --flake . (the current one)")
        if path.is_dir() and not _flake_above(path.resolve()):
            raise UsageError(f"--flake {url}: {path} has no flake.nix (nor has a directory above it, up to its "
                             "git repository's top)",
                             hint="give the directory that holds flake.nix; `mvmctl build DIR` builds an mvm.toml")
    elif ":" not in url and Path(url).is_dir():
        raise UsageError(f"--flake {url}: nix takes a bare word for a name in its flake registry, not for the "
                         f"directory {url} here", hint=f"write it as a path: --flake ./{url}")


#: The systems mvm boots: a flake with no default for this host's is built for its own.
SYSTEMS = ("x86_64-linux", "aarch64-linux")


def other_system(ref: str, flake: FlakeRef, *, nix: str, nix_args: Sequence[str], runner: Runner) -> FlakeRef | None:
    """For ``ref`` without ``#ATTR`` whose flake has no default for this host: its default
    for the one other system it builds (the seed guide's flake is ``aarch64-linux``). None
    when the flake has this host's default, whose evaluation then failed for its own reason."""
    if "#" in ref:
        return None
    apply = "ps: builtins.filter (s: ps.${s} ? default) (builtins.attrNames ps)"
    try:
        out = runner.run(nix_argv(nix, "eval", "--json", f"{flake.url}#packages", "--apply", apply, extra=nix_args),
                         desc=f"listing the systems {flake.url} builds", error=BuildError).output
        found = json.loads(out.strip().splitlines()[-1])
    except (CommandFailed, ValueError, IndexError):
        return None
    if not isinstance(found, list) or flake.attr.split(".")[1] in found:
        return None  # this host's default exists: its own error stands (a typo is not a reason to emulate)
    others = [parse_ref(ref, system) for system in SYSTEMS if system in found]
    return next((o for o in others if o.attr != flake.attr), None)


def image_key(out_path: str) -> str:
    blob = json.dumps({"builder": BUILDER_VERSION, "out": out_path}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def nix_argv(nix: str, command: str, *args: str, extra: Sequence[str] = ()) -> list[str]:
    return [nix, *NIX_FLAGS, command, *args, *extra]


def _run_nix(runner: Runner, argv: list[str], flake: FlakeRef, *, desc: str,
             on_line: Callable[[str], None] | None = None) -> str:
    seen: list[str] = []  # all of it: the error headline may be far above the tail

    def line(text: str) -> None:
        seen.append(text)
        if on_line:
            on_line(text)

    try:
        return runner.run(argv, desc=desc, on_line=line, error=BuildError).output
    except CommandFailed as exc:
        raise nixerrors.condense(
            "\n".join(seen) or exc.output or "", flake=flake.url, attr=flake.attr, system=host_system(),
            returncode=exc.returncode, argv=exc.argv,
        ) from None


def evaluate(flake: FlakeRef, *, nix: str, nix_args: Sequence[str], runner: Runner) -> str:
    """The store path the flake output would build, without building it."""
    out = _run_nix(
        runner,
        nix_argv(nix, "eval", "--raw", f"{flake.installable}.outPath", extra=nix_args),
        flake,
        desc=f"evaluating {flake.installable}",
    )
    lines = [ln.strip() for ln in out.splitlines() if ln.startswith("/")]
    if not lines:
        raise BuildError(f"nix did not print a store path for {flake.installable}", output=out[-2000:])
    return lines[-1].split()[0]


def realise(flake: FlakeRef, *, nix: str, nix_args: Sequence[str], runner: Runner,
            on_line: Callable[[str], None] | None) -> None:
    _run_nix(
        runner,
        nix_argv(nix, "build", "--no-link", "--print-build-logs", flake.installable, extra=nix_args),
        flake,
        desc=f"building {flake.installable} with nix",
        on_line=on_line,
    )


def read_output(out: Path, flake: FlakeRef) -> dict[str, Any]:
    """The manifest mkGuest wrote, checked: is this an mvm image, and is it complete?"""
    not_image = SpecError(
        f"{flake.installable} is not an mvm image (its output has no manifest.json)",
        hint="build the output with mvm.lib.${system}.mkGuest { ... } (see docs/nix.md)",
    )
    if not (out / "manifest.json").is_file():
        raise not_image
    try:
        doc = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"{out}/manifest.json is unreadable: {exc}",
                         hint=f"the build output is damaged: `nix store repair {out}`, then build again") from None
    if not isinstance(doc, dict) or doc.get("frontend") != "nix" or not isinstance(doc.get("guest"), dict):
        raise not_image
    if doc.get("schema_version") != 1:
        raise SpecError(
            f"{flake.installable} was made by an mkGuest with manifest schema "
            f"{doc.get('schema_version')}; this mvm reads schema 1",
            hint="update the flake's mvm input (nix flake lock --update-input mvm) or mvm itself",
        )
    for key in ("kernel", "initrd", "rootfs"):
        name = doc.get(key)
        if key == "initrd" and name is None:
            continue
        if not isinstance(name, str) or not (out / name).is_file():
            raise BuildError(f"{flake.installable}: the image has no {key} file ({name!r})",
                             hint="is it an mkGuest output? (mvm.lib.<system>.mkGuest makes the files mvm boots)")
    return doc


def kernel_notes(doc: dict[str, Any]) -> dict[str, str]:
    """How mkGuest chose the kernel to boot (``kernel_boot``: ``pvh`` for a vmlinux it
    extracted, ``bzimage`` when that had no PVH note) and why it fell back (``kernel_note``),
    kept in the image's source record."""
    return {key: doc[key] for key in ("kernel_image", "kernel_boot", "kernel_note") if isinstance(doc.get(key), str)}


def check_guest(guest: dict[str, Any], flake: FlakeRef) -> GuestSpec:
    """The guest document must be one the guest init understands: validate it as mvm.toml is."""
    model = {k: v for k, v in guest.items() if k not in NIX_GUEST_KEYS}
    try:
        return GuestSpec.model_validate(model, context=INPUT)
    except ValidationError as exc:
        first = exc.errors()[0]
        # a rule of mvm's own (a dependsOn loop, a bad name) is the spec's; a shape mkGuest
        # should never have made means its version and this mvm's differ
        ours = first["type"] == "value_error"
        raise SpecError(
            f"{flake.installable}: the guest in the image is invalid: {describe_error(first)}",  # type: ignore[arg-type]
            hint="fix it in the flake's mkGuest call" if ours else
            "the flake's mvm input and this mvm disagree; update one of them",
        ) from None


def build(
    ref: str,
    *,
    nix_args: Sequence[str] = (),
    layout: Layout,
    runner: Runner,
    on_stage: Callable[[str], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> tuple[Image, bool]:
    """Return (image, built): the image for flake output ``ref``, building it if needed."""
    flake = parse_ref(ref)
    nix = require_tool("nix")
    stage = on_stage or (lambda _: None)
    stage(f"evaluating {flake.installable}")
    try:
        out_path = evaluate(flake, nix=nix, nix_args=nix_args, runner=runner)
    except SpecError:
        other = other_system(ref, flake, nix=nix, nix_args=nix_args, runner=runner)
        if other is None:
            raise
        flake = other
        stage(f"the flake builds for {flake.attr.split('.')[1]}: evaluating {flake.installable}")
        out_path = evaluate(flake, nix=nix, nix_args=nix_args, runner=runner)
    key = image_key(out_path)
    store = ImageStore(layout.images)
    hit = store.get(key)
    if hit is not None:
        return hit, False

    stage("building with nix")
    realise(flake, nix=nix, nix_args=nix_args, runner=runner, on_line=on_line)
    out = Path(out_path)
    doc = read_output(out, flake)
    guest = check_guest(doc["guest"], flake)

    note = kernel_notes(doc).get("kernel_note")
    if note:
        log.warning("%s", note)
        stage(f"note: {note}")

    def make(staging: Path) -> Manifest:
        stage("importing into the image store")
        files = [doc["kernel"], doc["rootfs"]] + ([doc["initrd"]] if doc.get("initrd") else [])
        for name in files:
            link_or_copy((out / name).resolve(), staging / name)
        return Manifest(
            key=key,
            name=guest.name,
            frontend="nix",
            source={
                "flake": flake.url if "://" in flake.url or ":" in flake.url else str(Path(flake.url).resolve()),
                "attr": flake.attr,
                "out_path": out_path,
                "nix_args": list(nix_args),
                **kernel_notes(doc),
            },
            kernel=doc["kernel"],
            kernel_version=str(doc.get("kernel_version") or ""),
            initrd=doc.get("initrd"),
            rootfs=doc["rootfs"],
            arch=arches.image_arch(out / doc["kernel"], flake.attr),
            transports=list(doc.get("transports") or ["virtio-serial"]),
            guest=guest,
        )

    image = store.publish(key, make, on_wait=lambda: stage(WAITING_FOR_ANOTHER_BUILD))
    log.info("imported %s as image %s", out_path, key)
    return image, True
