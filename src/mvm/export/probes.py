"""Map mvm health checks onto probes KubeVirt can run without a guest agent.

mvm runs ``healthCmd`` inside the guest. KubeVirt runs a VMI's ``readinessProbe`` from
outside: ``httpGet`` and ``tcpSocket`` go from the kubelet to the pod, and masquerade
forwards them to the guest; ``exec`` probes need the qemu-guest-agent, which mvm images do
not have. So only checks whose command *is* an HTTP GET or a TCP connect to the guest
itself translate, and they translate exactly only when the command's success rule is the
probe's rule:

- ``curl -f URL`` (also ``-sf``, ``-fsS``, ``--fail``, ``-o /dev/null``, ``-m N``, ``-L``):
  fails on HTTP >= 400, like ``httpGet`` (which passes 200-399). Without ``-f`` curl passes
  any HTTP answer, so the check becomes a ``tcpSocket`` probe on the same port, with a note.
- ``wget -q -O- URL`` / ``wget --spider URL``: fails on HTTP errors, like ``httpGet``.
- ``nc -z [-w N] HOST PORT``: a TCP connect, like ``tcpSocket``.

The URL's host must be the guest itself (localhost, 127.0.0.1, ::1, 0.0.0.0). A trailing
``|| exit 1`` and redirections to /dev/null are ignored; any other shell syntax (pipes,
``&&``, ``;``, substitutions) makes the check untranslatable. Everything not recognised is
dropped with a reason, which the export result and vm.yaml's header carry.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "[::1]"})
_DEVNULL_REDIRECT = re.compile(r"\s+(?:[12]?>|&>)\s*/dev/null\b|\s+2>&1\b")
_OR_EXIT = re.compile(r"\s*\|\|\s*exit(?:\s+1)?\s*$")
_SHELL_OPERATORS = frozenset("();<>|&")

#: curl options that take no value and do not change what counts as success.
_CURL_FLAGS = {"s", "S", "f", "L", "k", "4", "6", "q"}
_CURL_LONG_FLAGS = {"--silent", "--show-error", "--fail", "--location", "--insecure", "--fail-early",
                    "--ipv4", "--ipv6", "--no-progress-meter", "-q", "--disable"}
#: curl options that take one value which does not matter to a probe.
_CURL_VALUE_OPTS = {"-o", "--output", "-m", "--max-time", "--connect-timeout", "--retry", "-A", "--user-agent"}


@dataclass(frozen=True)
class HttpGet:
    port: int
    path: str = "/"
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"


@dataclass(frozen=True)
class TcpSocket:
    port: int


Probe = HttpGet | TcpSocket


@dataclass(frozen=True)
class Recognised:
    """A command that maps onto ``probe``; ``note`` says where the mapping is approximate."""

    probe: Probe
    note: str | None = None


@dataclass(frozen=True)
class Unsupported:
    reason: str


def _tokens(cmd: str) -> list[str] | Unsupported:
    text = _OR_EXIT.sub("", cmd.strip())
    text = _DEVNULL_REDIRECT.sub("", text)
    if "$" in text or "`" in text:
        return Unsupported("it uses shell substitutions; KubeVirt probes run one fixed HTTP GET or TCP connect")
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError as exc:
        return Unsupported(f"it does not parse as a command ({exc})")
    if any(tok and set(tok) <= _SHELL_OPERATORS for tok in tokens):
        return Unsupported("it is a shell pipeline or list; KubeVirt probes run one HTTP GET or TCP connect")
    return tokens


def _local_url(url: str) -> HttpGet | Unsupported:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https"):
        return Unsupported(f"the URL scheme {parts.scheme!r} is not HTTP(S)")
    host = (parts.hostname or "").lower()
    if host not in LOCAL_HOSTS and f"[{host}]" not in LOCAL_HOSTS:
        return Unsupported(f"it checks {host!r}, not the guest itself; a probe can only reach the VM")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return Unsupported("the URL's port is not a number")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return HttpGet(port=port, path=path, scheme="HTTPS" if parts.scheme == "https" else "HTTP")


def _curl(args: list[str]) -> Recognised | Unsupported:
    fail = False
    urls: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _CURL_VALUE_OPTS:
            i += 2
            continue
        if arg in _CURL_LONG_FLAGS:
            fail = fail or arg == "--fail"
        elif arg.startswith("--"):
            if "=" in arg and arg.split("=", 1)[0] in _CURL_VALUE_OPTS:
                i += 1
                continue
            return Unsupported(f"curl option {arg} changes the request; a probe sends a plain GET")
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            if letters[-1] in "om" and set(letters[:-1]) <= _CURL_FLAGS:  # -so FILE, -sm 5
                fail = fail or "f" in letters
                i += 2
                continue
            if not set(letters) <= _CURL_FLAGS:
                return Unsupported(f"curl option {arg} changes the request; a probe sends a plain GET")
            fail = fail or "f" in letters
        else:
            urls.append(arg)
        i += 1
    if len(urls) != 1:
        return Unsupported("curl is not given exactly one URL")
    target = _local_url(urls[0])
    if isinstance(target, Unsupported):
        return target
    if fail:
        return Recognised(target)
    return Recognised(TcpSocket(target.port),
                      note="curl without -f passes on any HTTP answer, so this became a TCP connect "
                           "check (an httpGet probe would fail on HTTP errors); add -f for httpGet")


def _wget(args: list[str]) -> Recognised | Unsupported:
    urls = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-O", "-T", "-t", "--timeout", "--tries", "-U"):
            i += 2
            continue
        if arg in ("-q", "--quiet", "--spider", "-O-", "-qO-", "-nv", "--no-verbose") or arg.startswith(
            ("--timeout=", "--tries=", "-T", "-O")
        ):
            i += 1
            continue
        if arg.startswith("-"):
            return Unsupported(f"wget option {arg} changes the request; a probe sends a plain GET")
        urls.append(arg)
        i += 1
    if len(urls) != 1:
        return Unsupported("wget is not given exactly one URL")
    target = _local_url(urls[0])
    return target if isinstance(target, Unsupported) else Recognised(target)


def _nc(args: list[str]) -> Recognised | Unsupported:
    zero_io = False
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-w", "-W"):
            i += 2
            continue
        if arg.startswith("-") and len(arg) > 1:
            letters = set(arg[1:].rstrip("0123456789"))
            if not letters <= {"z", "v", "n", "w"}:
                return Unsupported(f"nc option {arg} is not a plain TCP connect")
            zero_io = zero_io or "z" in letters
        else:
            rest.append(arg)
        i += 1
    if not zero_io:
        return Unsupported("nc without -z sends or waits for data; only `nc -z HOST PORT` maps to tcpSocket")
    if len(rest) != 2 or not rest[1].isdigit():
        return Unsupported("nc -z is not given exactly one host and one numeric port")
    if rest[0].lower() not in LOCAL_HOSTS:
        return Unsupported(f"it checks {rest[0]!r}, not the guest itself; a probe can only reach the VM")
    return Recognised(TcpSocket(int(rest[1])))


def recognise(cmd: str) -> Recognised | Unsupported:
    """What probe, if any, a ``healthCmd`` is equivalent to."""
    tokens = _tokens(cmd)
    if isinstance(tokens, Unsupported):
        return tokens
    if not tokens:
        return Unsupported("the command is empty")
    prog, args = tokens[0].rsplit("/", 1)[-1], tokens[1:]
    if prog == "curl":
        result = _curl(args)
    elif prog == "wget":
        result = _wget(args)
    elif prog in ("nc", "ncat", "netcat"):
        result = _nc(args)
    else:
        return Unsupported(f"`{prog}` runs inside the guest; KubeVirt runs exec probes only through the "
                           "qemu-guest-agent, which mvm images do not have")
    if isinstance(result, Recognised) and not 0 < result.probe.port < 65536:
        return Unsupported(f"port {result.probe.port} is out of range")
    return result
