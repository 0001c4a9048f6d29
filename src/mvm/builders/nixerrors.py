"""Nix's error output, condensed into one mvm error with a hint.

Nix prints an error as a headline (``error: attribute 'pyhton3' missing``), a position
(``at /nix/store/<hash>-source/flake.nix:12:25:``), a code excerpt and sometimes a
suggestion (``Did you mean one of python3, ...?``). Users wrote ``flake.nix``, not
``/nix/store/<hash>-source/flake.nix``, so positions are shown relative to the flake, and
the common mistakes the seed guide lists get a short message and a hint of what to do.
Pure functions over text: unit-tested without Nix.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

from ..errors import BuildError, MvmError, SpecError
from ..names import ARCHES
from . import arches

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STORE_SOURCE = re.compile(r"/nix/store/[a-z0-9]{32}-[^/\s:']+")
POSITION = re.compile(r"^\s*at (?P<file>/nix/store/[a-z0-9]{32}-[^/\s:]+(?P<rel>/[^:]*)?|«[^»]*»):"
                      r"(?P<line>\d+):(?P<col>\d+):\s*$")
EXCERPT = re.compile(r"^\s*(\d+)?\|")
SUGGESTION = re.compile(r"^\s*Did you mean (?:one of )?(?P<names>.+?)\??$")
#: A builder of another architecture that the kernel cannot run (no binfmt handler for it).
EXEC_FORMAT = re.compile(r"executing '([^']+)': Exec format error")
SYSTEM_IN_ATTR = re.compile(r"\b(x86_64|aarch64)-linux\b")


@dataclass
class NixError:
    """The parts of one Nix error message."""

    headline: str
    position: str | None = None  # "flake.nix:12:25", relative to the flake when possible
    excerpt: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)  # further lines of the headline


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def _relative(file: str, rel: str | None) -> str:
    if file.startswith("«"):
        return file
    return (rel or "/").lstrip("/") or file


def parse(output: str) -> NixError | None:
    """The first ``error:`` in ``output`` and what belongs to it; None if there is none."""
    lines = strip_ansi(output).splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("error:")), None)
    if start is None:
        return None
    err = NixError(headline=lines[start].lstrip().removeprefix("error:").strip())
    i = start + 1
    # continuation lines of a multi-line headline, up to the first blank line
    while i < len(lines) and lines[i].strip() and not POSITION.match(lines[i]):
        err.detail.append(lines[i].strip())
        i += 1
    excerpt_done = False
    for line in lines[i:]:
        m = POSITION.match(line)
        if m and err.position is None:
            err.position = f"{_relative(m['file'], m['rel'])}:{m['line']}:{m['col']}"
            continue
        if err.position is not None and not excerpt_done:
            if EXCERPT.match(line):
                err.excerpt.append(line.rstrip())
                continue
            excerpt_done = bool(err.excerpt)  # only the block right after the position
        s = SUGGESTION.match(line)
        if s:
            err.suggestions = [n.strip() for n in s["names"].split(",") if n.strip()]
    return err


def _user_path(path: str) -> str:
    """``/nix/store/<hash>-source/app/x`` -> ``./app/x`` (a path inside the flake)."""
    m = STORE_SOURCE.match(path)
    if not m:
        return path
    rest = path[m.end():]
    return "." + rest if rest else "the flake's directory"


def foreign_system_hint(wanted: str, host: str, extra_platforms_set: bool = False) -> str:
    """Both ways out of "this machine cannot build for ``wanted``": build for the host, or
    let nix emulate ``wanted`` (qemu-user through binfmt_misc), with the exact lines: only
    the steps still to do (the handler may be registered already, for mvm's Debian builds)."""
    fix = f"either build for this machine: in flake.nix set `system = \"{host}\";`"
    arch = next((a for a in ARCHES if f"{a}-linux" == wanted), None)
    if arch is None or not host.endswith("-linux"):
        return fix + f", or give nix a {wanted} builder (remote builders)"
    binfmt = (f"apt-get install qemu-user-static binfmt-support && {arches.register_command(arch)}"
              " (scripts/setup.sh does this; again after a reboot)")
    if extra_platforms_set:
        return f"{fix}\nor register qemu-user's {arch} handler, which nix's emulation needs: {binfmt}"
    lines = (f"{fix}\nor let nix emulate {wanted}: add to /etc/nix/nix.conf (then restart nix-daemon if one "
             f"runs; NIX_CONFIG works only without a daemon)\n    extra-platforms = {wanted}")
    if arches.binfmt_enabled(arch):
        return lines + f"\n(qemu-user's {arch} handler is registered already)"
    return f"{lines}\nand register qemu-user's {arch} handler: {binfmt}"


def _failed_build(err: NixError) -> str | None:
    """``NAME[: why]`` of a derivation whose builder failed, in old nix's words (``builder for
    '….drv' failed with exit code 1``) or newer nix's (``Cannot build '….drv'.`` with a
    ``Reason:`` line below); None for any other error."""
    m = re.match(r"builder for '/nix/store/[a-z0-9]{32}-([^']+)\.drv' failed(.*)", err.headline)
    if m:
        return m[1] + m[2].rstrip(";")
    m = re.match(r"Cannot build '/nix/store/[a-z0-9]{32}-([^']+)\.drv'\.", err.headline)
    reason = next((ln.removeprefix("Reason:").strip() for ln in err.detail if ln.startswith("Reason:")), None)
    return f"{m[1]}: {reason.rstrip('.')}" if m and reason else None


def condense(output: str, *, flake: str, attr: str, system: str,
             returncode: int | None = None, argv: list[str] | None = None) -> MvmError:
    """One mvm error for nix's failure output (``flake``/``attr`` name what was built)."""
    err = parse(output)
    if err is None:
        return BuildError(
            f"nix failed on {flake} (exit code {returncode})",
            argv=argv, returncode=returncode, output=output[-4000:] or None,
            hint="run the same `nix build` by hand to see more",
        )
    head = err.headline
    where = f"{err.position}: " if err.position and not err.position.startswith("«") else ""
    excerpt = textwrap.dedent("\n".join(err.excerpt)) or None

    if head.startswith("mkGuest:"):
        return SpecError(head, hint="fix that attribute in the mkGuest call "
                         "(accepted attributes: docs/nix.md)", output=excerpt)

    m = re.match(r"attribute '([^']+)' missing", head)
    if m:
        name = m[1]
        close = f"did you mean '{err.suggestions[0]}'? " if err.suggestions else ""
        pkg_hint = (f"{close}If it is a package, check its name at https://search.nixos.org/packages "
                    f"or with `nix search nixpkgs {name}`")
        return SpecError(f"{where}attribute '{name}' does not exist", hint=pkg_hint, output=excerpt)

    m = re.match(r"getting status of '([^']+)': No such file or directory", head)
    if m:
        path = _user_path(m[1])
        return SpecError(
            f"{where}the flake refers to a path that does not exist: {path}",
            hint="check the path (paths are relative to flake.nix). In a git repository a flake "
            "sees only files git knows: `git add` new files",
            output=excerpt,
        )

    if "infinite recursion encountered" in head:
        return SpecError(
            f"{where}infinite recursion",
            hint="a value is defined in terms of itself, usually a let binding or attribute "
            "that refers to its own name (e.g. `pkgs = pkgs.foo;`); check the names at that line",
            output=excerpt,
        )

    m = re.match(r"undefined variable '([^']+)'", head)
    if m:
        return SpecError(
            f"{where}undefined variable '{m[1]}'",
            hint="check the spelling; names come from `let ... in`, the function's arguments "
            "(`outputs = { mvm, nixpkgs, ... }:`) or `with`",
            output=excerpt,
        )

    if head.startswith("syntax error"):
        return SpecError(f"{where}{head}", hint="check brackets, quotes and semicolons near that position",
                         output=excerpt)

    m = re.search(r"does not provide attribute '([^']+)'", head)
    if m:
        wanted = attr
        hint = f"name the output to build: --flake {flake}#ATTR"
        if attr == f"packages.{system}.default":
            hint = (f"this machine builds {system}: in flake.nix set `system = \"{system}\";` "
                    f"(the guide's example uses aarch64-linux), or name the output: --flake {flake}#ATTR")
        return SpecError(f"the flake {flake} has no output {wanted}", hint=hint)

    m = re.search(r"path '([^']+)' does not contain a 'flake.nix'", head)
    if m or "does not contain a 'flake.nix'" in head:
        return SpecError(f"no flake.nix in {m[1] if m else flake}",
                         hint="pass the directory that holds flake.nix: --flake DIR")

    m = re.search(r"a '([^']+)' with features \{[^}]*\} is required to build '[^']+', but I am a '([^']+)'", head)
    if not m:  # nix >= 2.25 or so: "Cannot build '….drv'." / "Required system: '…'" / "Current system: '…'"
        m = re.search(r"^Required system: '([^']+)'.*^Current system: '([^']+)'", "\n".join(err.detail), re.M | re.S)
    if m and m[1] != m[2]:
        return SpecError(f"this machine ({m[2]}) cannot build for {m[1]}", hint=foreign_system_hint(m[1], m[2]))

    m = EXEC_FORMAT.search(strip_ansi(output))
    if m:
        named = SYSTEM_IN_ATTR.search(attr)
        other = named[0] if named and named[0] != system else None
        hint = foreign_system_hint(other, system, extra_platforms_set=True) if other else (
            "the build runs a program of another architecture, which this kernel cannot run: register "
            "qemu-user's handlers (apt-get install qemu-user-static binfmt-support), or build for "
            f"this machine ({system})")
        return BuildError(
            f"nix could not run a build program for {other or 'another architecture'} here "
            f"({m[1].rsplit('/', 1)[-1]}: Exec format error)",
            argv=argv, returncode=returncode, hint=hint,
        )

    if re.search(r"the group '[^']+' specified in 'build-users-group' does not exist", head):
        return BuildError(
            head, argv=argv, returncode=returncode,
            hint="nix is set up to build as unprivileged build users that do not exist (Debian's "
            "nix-bin alone creates none): install nix-setup-systemd, or as root set "
            "`build-users-group =` in /etc/nix/nix.conf (or NIX_CONFIG)",
        )

    if re.search(r"unable to download|Could not resolve host|Couldn't resolve host|"
                 r"unable to fetch|cannot fetch|Failed to connect", head + " " + " ".join(err.detail)):
        return BuildError(
            f"nix could not fetch a flake input: {head}",
            argv=argv, returncode=returncode,
            hint="check the network. Offline, point inputs at local copies: "
            "--override-input NAME path:/some/dir",
        )

    failed = _failed_build(err)
    if failed:
        tail = "\n".join(ln for ln in strip_ansi(output).splitlines()[-25:] if ln.strip())
        return BuildError(
            f"nix could not build {failed}",
            argv=argv, returncode=returncode, output=tail,
            hint="the build's own output is above; `nix log` on the .drv shows all of it",
        )

    return BuildError(f"{where}{head}", argv=argv, returncode=returncode,
                      output=excerpt or "\n".join(err.detail) or None,
                      hint="rerun with `--nix-arg=--show-trace` for nix's full trace")
