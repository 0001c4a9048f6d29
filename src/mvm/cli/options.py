"""Options shared by several commands, declared once."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Annotated

import typer

import mvm


def memory_mib(text: str) -> int:
    """``--memory``: MiB as a number (512), or with a unit as ``docker run -m`` takes it
    (512m, 2g, 1.5G, 512MiB)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:([mMgG])(?:i?[bB])?)?", text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a size: give MiB (512) or a size with m or g (512m, 2g)")
    mib = float(match.group(1)) * (1024 if (match.group(2) or "m") in "gG" else 1)
    if not mib.is_integer():
        raise typer.BadParameter(f"{text!r} is not a whole number of MiB")
    return int(mib)


def complete_vm_names(incomplete: str) -> list[str]:
    """Shell completion of VM names."""
    try:
        return [name for name in mvm.vm_names() if name.startswith(incomplete)]
    except (OSError, mvm.MvmError):
        return []


def _completing(names: Callable[[], Iterable[str]], incomplete: str) -> list[str]:
    """The names that start with what was typed; none when they cannot be read."""
    try:
        return sorted({name for name in names() if name.startswith(incomplete)})
    except (OSError, mvm.MvmError):
        return []


def complete_images(incomplete: str) -> list[str]:
    """Shell completion of what ``rmi`` takes: guest names and image keys."""
    return _completing(lambda: [n for img in mvm.images() for n in (img.name, img.key)], incomplete)


def complete_templates(incomplete: str) -> list[str]:
    return _completing(lambda: [t.key for t in mvm.templates()], incomplete)


def complete_volumes(incomplete: str) -> list[str]:
    return _completing(lambda: [v.name for v in mvm.volume_ls()], incomplete)


def complete_arches(incomplete: str) -> list[str]:
    return [a for a in ("x86_64", "aarch64") if a.startswith(incomplete)]


def complete_hypervisors(incomplete: str) -> list[str]:
    return [h for h in ("auto", "qemu-kvm", "qemu-tcg") if h.startswith(incomplete)]


def Memory(default_help: str) -> object:
    """The ``--memory``/``-m`` option, with what its default is."""
    return typer.Option("--memory", "-m", metavar="SIZE", parser=memory_mib, show_default=False,
                        help=f"Memory, in MiB or with a unit (512, 512m, 2g; default: {default_help}).")


Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the names (ls: VM names; images: "
                                     "full image keys), one per line, for scripts.")]
VMName = Annotated[str, typer.Argument(metavar="NAME", help="The VM's name (see `mvmctl ls`).",
                                       show_default=False, autocompletion=complete_vm_names)]
Ports = Annotated[
    list[str] | None,
    typer.Option(
        "-p", "--port",
        metavar="HOST:GUEST",
        help="Forward a host port to a guest port: HOST:GUEST, IP:HOST:GUEST, or GUEST alone (a free "
        "host port is picked; `mvmctl ls` shows it), optional /tcp|/udp. Binds 127.0.0.1 unless an IP "
        "is given. Repeatable.",
        show_default=False,
    ),
]
Env = Annotated[
    list[str] | None,
    typer.Option("-e", "--env", metavar="KEY=VALUE",
                 help="Set KEY=VALUE in every service's environment (overrides the spec). Repeatable.",
                 show_default=False),
]
ExecEnv = Annotated[
    list[str] | None,
    typer.Option("-e", "--env", metavar="KEY=VALUE",
                 help="Set KEY=VALUE in the command's environment. Repeatable.", show_default=False),
]
Volumes = Annotated[
    list[str] | None,
    typer.Option(
        "-v", "--volume",
        metavar="HOST:PATH[:MB|:ro][:secret]",
        help="Attach a volume. HOSTDIR:/guest/path is read-only: an image of HOSTDIR built at each up, "
        "mounted ro,nosuid,nodev,noexec (add :secret, or use a path containing 'secret', to hide it from "
        "non-service users). HOST:/guest/path:SIZE_MB (MiB, at least 8) is writable and persistent: created "
        "once from HOST's files, never reformatted, grown when SIZE_MB grows; :secret makes its root "
        "directory 0770 for service users only (see `mvmctl volume --help`). Repeatable.",
        show_default=False,
    ),
]
SpecPath = Annotated[
    str,
    typer.Argument(metavar="PATH", help="Directory holding mvm.toml (or the file itself).", show_default="."),
]
Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="x86_64|aarch64",
        autocompletion=complete_arches,
        help="Build the guest for this CPU architecture instead of the spec's `arch` (default: this "
        "host's). Another architecture than the host's is emulated (slower). With --flake: builds "
        "packages.<arch>-linux.default.",
        show_default=False,
    ),
]
Flake = Annotated[
    str | None,
    typer.Option(
        "--flake",
        metavar="REF[#ATTR]",
        help="Build from a Nix flake instead of mvm.toml: REF[#ATTR] (default ATTR: "
        "packages.<this system>.default, else the one system the flake builds), e.g. `.` or `github:me/app#guest`.",
        show_default=False,
    ),
]
OverrideInput = Annotated[
    list[str] | None,
    typer.Option(
        "--override-input",
        metavar="NAME URL",
        help="With --flake: use URL for the flake input NAME (passed to nix; NAME=URL also works). "
        "Repeatable.",
        show_default=False,
    ),
]
NixArg = Annotated[
    list[str] | None,
    typer.Option(
        "--nix-arg",
        metavar="ARG",
        help="With --flake: pass ARG to nix as is, e.g. --nix-arg=--show-trace. Repeatable.",
        show_default=False,
    ),
]


def click_exceptions() -> ModuleType:
    """The exceptions of the click that parses our command line. Typer 0.2x bundles its own
    copy (``typer._click``), whose exceptions are not ``click``'s: catching or raising
    ``click``'s would turn a usage error into a traceback. (``typer.Exit`` and
    ``typer.Abort`` are the right classes under every version.)"""
    try:
        return importlib.import_module("typer._click.exceptions")
    except ImportError:
        return importlib.import_module("click.exceptions")


def missing(what: str) -> Exception:
    """A command line that lacks what the command needs (or asks two contradicting things):
    exit 2 with the usage line, as for any argument the parser itself finds missing (README's
    exit codes)."""
    cls: type[Exception] = click_exceptions().UsageError
    return cls(what)


WaitTimeout = Annotated[float | None, typer.Option(
    "--timeout", metavar="SECONDS", min=0, show_default=False,
    help=f"Seconds --wait waits for health (default {mvm.HEALTH_TIMEOUT:.0f}); only with --wait.")]


def wait_timeout(wait: bool, timeout: float | None) -> float:
    """--timeout's value; refused without --wait, where it would silently mean nothing."""
    if timeout is not None and not wait:
        raise missing(f"--timeout {timeout:g} is how long --wait waits for health, and --wait is not given: "
                      "add --wait, or drop --timeout")
    return mvm.HEALTH_TIMEOUT if timeout is None else timeout


def join_override_pairs(args: list[str]) -> list[str]:
    """Nix spells it ``--override-input NAME URL``; the option parser takes one value, so
    the pair becomes ``NAME=URL`` before parsing (``nix_args`` splits it again)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        if (arg == "--override-input" and i + 2 < len(args) and "=" not in args[i + 1]
                and not args[i + 2].startswith("-")):
            out += [arg, f"{args[i + 1]}={args[i + 2]}"]
            i += 3
            continue
        out.append(arg)
        i += 1
    return out


def nix_args(override_input: list[str] | None, nix_arg: list[str] | None) -> list[str]:
    """The extra arguments for nix: each NAME=URL override, then the raw --nix-arg values."""
    from mvm import UsageError

    args: list[str] = []
    for pair in override_input or []:
        name, sep, url = pair.partition("=")
        if not sep or not name or not url:
            raise UsageError(f"--override-input {pair!r}: expected NAME URL",
                             hint="e.g. --override-input nixpkgs path:/src/nixpkgs")
        args += ["--override-input", name, url]
    return args + list(nix_arg or [])
