"""Where the Debian builder gets packages: the host's own apt sources and proxy.

A user behind a company mirror or proxy has told apt already; mmdebstrap runs its own apt,
which reads neither, so they are passed on: every ``deb`` source of the host's suite (and
its ``-updates`` and ``-security``) becomes a mirror line, and apt's proxy settings become
``--aptopt``s. Without usable sources: ``deb.debian.org``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .._proc import Runner
from ..errors import CommandFailed, ToolMissing

DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT = Path("/etc/apt")


@dataclass(frozen=True)
class AptSources:
    suite: str
    #: mmdebstrap mirror arguments, each a sources.list line (``deb URI SUITE main``)
    mirrors: list[str] = field(default_factory=list)

    @property
    def primary(self) -> str:
        """The first mirror's URI (for the manifest)."""
        return self.mirrors[0].split()[1] if self.mirrors else DEFAULT_MIRROR


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The Debian suite of this host (the guest gets the same release), ``bookworm`` if unknown."""
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("VERSION_CODENAME=") and line.split("=", 1)[1].strip():
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "bookworm"


def _one_line_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of each ``deb`` line of a sources.list file."""
    out = []
    for raw in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            out.append((line[1], [line[2]], line[3:]))
    return out


def _deb822_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of each enabled ``Types: deb`` stanza of a .sources file."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    return out


def host_sources(suite: str | None = None, apt: Path = APT) -> AptSources:
    suite = suite or host_suite()
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    entries: list[tuple[str, list[str], list[str]]] = []
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for f in files:
        try:
            entries += _one_line_entries(f.read_text())
        except OSError:
            continue
    for f in sorted((apt / "sources.list.d").glob("*.sources")):
        try:
            entries += _deb822_entries(f.read_text())
        except OSError:
            continue
    mirrors = []
    for uri, suites, components in entries:
        for s in suites:
            if s in wanted and "main" in components:
                line = f"deb {uri.rstrip('/')} {s} main"
                if line not in mirrors:
                    mirrors.append(line)
    if not any(m.split()[2] == suite for m in mirrors):  # the suite itself must come from somewhere
        mirrors.insert(0, f"deb {DEFAULT_MIRROR} {suite} main")
    return AptSources(suite=suite, mirrors=mirrors)


def proxy_options(runner: Runner) -> list[str]:
    """apt's proxy settings on this host, as ``--aptopt`` values for mmdebstrap's apt."""
    try:
        dump = runner.run(["apt-config", "dump"], desc="reading apt's configuration").output
    except (ToolMissing, CommandFailed):  # no apt-config, or it failed: nothing to pass on
        return []
    return [line.rstrip(";") for line in dump.splitlines()
            if re.match(r'Acquire::(https?|ftp)::Proxy(::\S+)? "', line)]
