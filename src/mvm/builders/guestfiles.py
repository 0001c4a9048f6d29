"""The files every mvm rootfs carries, whichever front end built it.

- ``/usr/lib/mvm/mvm/guest/*.py``: the stdlib-only guest init and agent (this package's
  ``mvm.guest``), under an empty ``mvm`` package so it imports as ``mvm.guest``.
- ``/usr/lib/mvm/init``: the PID 1 entry point, with the image's Python in its shebang.
- ``/etc/mvm/guest.json``: the guest model.
- the service users: ``mvm`` (uid 1000) plus any other ``user`` a service names. Every
  service user is in group ``mvm``, which is how secret volumes stay readable to services
  and to no one else.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..guest.protocol import INIT_PATH
from ..names import DEFAULT_UID

AGENT_DIR = "usr/lib/mvm"


def guest_sources() -> dict[str, bytes]:
    pkg = resources.files("mvm.guest")
    return {
        entry.name: entry.read_bytes()
        for entry in sorted(pkg.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".py")
    }


def agent_digest() -> str:
    h = hashlib.sha256()
    for name, data in guest_sources().items():
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def init_script(python: str) -> str:
    """guest/entry.py behind a shebang for the image's Python (nix/mkguest.nix does the same)."""
    return f"#!{python} -IS\n" + guest_sources()["entry.py"].decode()


def service_users(guest: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, uid) of every non-root user the guest needs, ``mvm`` first."""
    users = [("mvm", DEFAULT_UID)]
    for svc in (guest.get("services") or {}).values():
        user = svc.get("user") or "mvm"
        if user != "root" and user not in dict(users):
            users.append((user, DEFAULT_UID + len(users)))
    return users


def account_lines(guest: dict[str, Any]) -> dict[str, list[str]]:
    """Lines to append to /etc/passwd, /etc/group and /etc/shadow."""
    users = service_users(guest)
    passwd = [f"{u}:x:{uid}:{uid}:mvm service user:/home/{u}:/bin/sh" for u, uid in users]
    members = ",".join(u for u, _ in users[1:])
    group = [f"mvm:x:{DEFAULT_UID}:{members}"] + [f"{u}:x:{uid}:" for u, uid in users[1:]]
    shadow = [f"{u}:!:19000:0:99999:7:::" for u, _ in users]
    return {"passwd": passwd, "group": group, "shadow": shadow}


def stage_agent(dest: Path, *, python: str) -> None:
    """Write the agent and the PID 1 entry point under ``dest`` (a rootfs overlay)."""
    agent = dest / AGENT_DIR / "mvm"
    (agent / "guest").mkdir(parents=True, exist_ok=True)
    (agent / "__init__.py").write_text("")
    for name, data in guest_sources().items():
        (agent / "guest" / name).write_bytes(data)
    init = dest / INIT_PATH.lstrip("/")
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_text(init_script(python))
    init.chmod(0o755)


def guest_json(guest: dict[str, Any]) -> str:
    """The text of ``/etc/mvm/guest.json``."""
    return json.dumps(guest, indent=2, sort_keys=True) + "\n"
