"""Per-boot settings from the kernel command line, for guests booted without an mvm host.

Under ``mvmctl up`` the per-boot settings (VM name, ``-e`` overrides, volumes) come on the
config disk. A guest exported to KubeVirt has no config disk; whoever deploys it sets
them in ``kernelArgs`` instead:

- ``mvm.standalone=1``: there is no mvm host. Do not wait for the config disk, take the
  address by DHCP, write service logs and health transitions to the serial console.
- ``mvm.hostname=NAME``: the VM's name (what ``up --name`` gives), used as the hostname
  when the spec sets none.
- ``mvm.env.KEY=VALUE``: an environment override for every service (``up -e KEY=VALUE``).
- ``mvm.template=1``: this boot becomes a template (fast start): no config disk; the
  per-boot config arrives later through the agent's ``configure``, after the host saved
  the machine waiting for it.

Parsing follows the kernel's own (``next_arg`` in lib/cmdline.c): arguments are separated
by spaces outside double quotes, and quotes around a value (``key="a b"``) are removed.
Stdlib only.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import Any

PROC_CMDLINE = "/proc/cmdline"
PREFIX = "mvm."
ENV_PREFIX = "mvm.env."


def split(text: str) -> list[str]:
    """Kernel command line -> arguments, with the quotes the kernel would remove removed."""
    args: list[str] = []
    current: list[str] = []
    in_quote = False
    started = False
    for ch in text:
        if ch == '"':
            in_quote = not in_quote
            started = True
            continue
        if ch.isspace() and not in_quote:
            if started:
                args.append("".join(current))
                current, started = [], False
            continue
        current.append(ch)
        started = True
    if started:
        args.append("".join(current))
    return args


def _valid_env_name(name: str) -> bool:
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(
        c.isascii() and (c.isalnum() or c == "_") for c in name
    )


def settings(args: list[str]) -> dict[str, Any]:
    """``{"standalone": bool, "vm": str | None, "env": {KEY: VALUE}}`` from the arguments;
    unknown ``mvm.*`` arguments and malformed env names are ignored."""
    result: dict[str, Any] = {"standalone": False, "template": False, "vm": None, "env": {}}
    for arg in args:
        if not arg.startswith(PREFIX):
            continue
        key, sep, value = arg.partition("=")
        if key == "mvm.standalone":
            result["standalone"] = not sep or value not in ("0", "no", "false", "off")
        elif key == "mvm.template":
            result["template"] = not sep or value not in ("0", "no", "false", "off")
        elif key == "mvm.hostname" and value:
            result["vm"] = value
        elif key.startswith(ENV_PREFIX) and sep and _valid_env_name(key[len(ENV_PREFIX):]):
            result["env"][key[len(ENV_PREFIX):]] = value
    return result


def read(path: str = PROC_CMDLINE) -> list[str]:
    try:
        with open(path) as f:
            return split(f.read())
    except OSError:
        return []
