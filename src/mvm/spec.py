"""The guest model shared by both front ends, and the ``mvm.toml`` loader.

``mkGuest`` (Nix) and ``mvm.toml`` describe the same thing, field for field, in the seed's
camelCase names. The build writes the model into the rootfs as ``/etc/mvm/guest.json``;
the guest init reads only that file. Validation errors name the file and the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import SpecError
from .guest import protocol
from .names import (
    ARCH_ALIASES,
    MIN_MEMORY_MIB,
    SERVICE_RE,
    USER_RE,
    Arch,
    check_env,
    check_hostname,
    check_vm_name,
)

GUEST_JSON_SCHEMA = 1
DEFAULT_USER = "mvm"
#: The validation context of a spec as it comes in (mvm.toml, a flake's guest): rules added
#: since images were first built apply to it, and not to the manifests of stored images.
INPUT = {"input": True}


class _Model(BaseModel):
    # strict: `cpus = "2"` is refused, not coerced (env's numbers are the one exception)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, defer_build=True, strict=True)


class Service(_Model):
    """A supervised long-running process. ``command`` runs under ``sh -c`` as ``user``."""

    command: str = Field(min_length=1)
    pre_start: str = Field("", alias="preStart")
    env: dict[str, str] = Field(default_factory=dict)
    user: str = DEFAULT_USER
    restart: Literal["always", "on-failure", "no"] = "always"
    depends_on: list[str] = Field(default_factory=list, alias="dependsOn")

    _check_env = field_validator("env")(check_env)

    @field_validator("env", mode="before")
    @classmethod
    def _env_numbers(cls, value: Any) -> Any:
        """``env = { PORT = 8080 }`` means the string ``"8080"``, as in mkGuest (which converts
        numbers with toString). Whole numbers only: a float's text differs between the two
        (toString 0.1 is "0.100000"), so it is refused with "quote it", as true/false are."""
        if not isinstance(value, dict):
            return value
        return {k: str(v) if type(v) is int else v for k, v in value.items()}

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not USER_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid user name")
        return value


class HealthCheck(_Model):
    """A command run by the guest agent; exit 0 means healthy."""

    health_cmd: str = Field(alias="healthCmd", min_length=1)
    health_interval_secs: float = Field(30, alias="healthIntervalSecs", gt=0)
    health_timeout_secs: float = Field(10, alias="healthTimeoutSecs", gt=0)
    #: Failures in this window after boot keep the check "starting". Default: one interval.
    startup_grace_secs: float | None = Field(None, alias="startupGraceSecs", ge=0)


class GuestSpec(_Model):
    name: str
    packages: list[str] = Field(default_factory=list)
    hostname: str | None = None
    cpus: int = Field(1, ge=1, le=64)
    memory: int = Field(512, ge=MIN_MEMORY_MIB, le=65536, description="MiB")
    #: The most a VM's console and event logs take on the host (MiB), whatever the guest writes.
    log_limit_mb: int = Field(64, alias="logLimitMb", ge=1, le=1024 * 1024)
    services: dict[str, Service] = Field(default_factory=dict)
    health_checks: dict[str, HealthCheck] = Field(default_factory=dict, alias="healthChecks")
    #: mvm.toml only: guest path -> file or directory (relative to mvm.toml) copied into the
    #: image. The Nix front end gets the same effect from store paths (``${./server.py}``).
    files: dict[str, str] = Field(default_factory=dict)
    #: mvm.toml only: the guest's CPU architecture; None builds for the host's. A flake's
    #: comes from its ``system`` (the image records the one it was built for).
    arch: Arch | None = None

    _check_name = field_validator("name")(check_vm_name)

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Where a spec comes in (INPUT), not where a stored manifest is read: an image built
        # before the check keeps working.
        return check_hostname(value) if info.context == INPUT else value

    @field_validator("files")
    @classmethod
    def _files(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for target in value:
            parts = target.split("/")
            if not target.startswith("/") or ".." in parts or target.rstrip("/") == "":
                raise ValueError(f"{target!r} must be an absolute guest path (not / and without '..')")
            if any(ord(c) < 32 or c == "\x7f" for c in target):
                raise ValueError(f"{target!r}: a guest path cannot hold a line break or another control character")
            if info.context == INPUT:  # images built before the rule keep working
                _check_file_target(target)
        return value

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: list[str]) -> list[str]:
        for pkg in value:
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.:=~-]*", pkg):
                raise ValueError(f"{pkg!r} is not a valid Debian package name")
        return value

    @field_validator("services")
    @classmethod
    def _service_names(cls, value: dict[str, Service]) -> dict[str, Service]:
        for svc in value:
            if not SERVICE_RE.fullmatch(svc):
                raise ValueError(f"{svc!r} is not a valid service name")
        return value

    @model_validator(mode="after")
    def _depends(self) -> GuestSpec:
        for name, svc in self.services.items():
            for dep in svc.depends_on:
                if dep not in self.services:
                    raise ValueError(f"services.{name}.dependsOn names unknown service {dep!r}")
        cycle = _dependency_cycle({name: svc.depends_on for name, svc in self.services.items()})
        if cycle:
            raise ValueError(f"services depend on each other in a loop ({' -> '.join(cycle)}), so none of them "
                             "would ever start: remove one dependsOn")
        return self

    def guest_json(self, *, frontend: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The document the guest init reads from /etc/mvm/guest.json."""
        doc = self.model_dump(by_alias=True, mode="json", exclude={"files", "arch"})
        doc["schema_version"] = GUEST_JSON_SCHEMA
        doc["frontend"] = frontend
        doc.update(extra or {})
        return doc

    def digest(self) -> str:
        """Of what the guest is; not of ``arch``, which image keys hold resolved (None: the host's)."""
        blob = json.dumps(self.model_dump(by_alias=True, mode="json", exclude={"arch"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


#: Links in every Debian root (merged /usr; /var/run and /var/lock point into /run): a file put
#: through one lands where it points.
FILE_ALIASES = (("/lib", "/usr/lib"), ("/var/run", "/run"), ("/var/lock", "/run/lock"))


def _check_file_target(target: str) -> None:
    """A ``files`` target where the guest would never see it, or that would break the guest."""
    path = "/" + "/".join(p for p in target.split("/") if p not in ("", "."))
    for alias, real in FILE_ALIASES:  # Debian's links: /lib is usr/lib, /var/run is /run ...
        if path == alias or path.startswith(alias + "/"):
            path = real + path[len(alias):]
    under = next((t for t in (*protocol.MVM_TREES, *protocol.BOOT_MOUNTS) if path == t or path.startswith(t + "/")),
                 None)
    if under in protocol.MVM_TREES:
        raise ValueError(f"{target!r} is under {under}, mvm's own files in the guest (its agent and config): "
                         "a file there would replace them and the guest would not boot; put it elsewhere, "
                         "e.g. /srv or /opt")
    if under is not None:
        raise ValueError(f"{target!r} would be hidden: the guest mounts a fresh file system on {under} at every "
                         f"boot; put the file elsewhere (e.g. /srv{path}) and copy or link it in a service's "
                         "preStart if it must be there")


def _dependency_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A loop in ``dependsOn``, as the path around it (``a -> b -> a``), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        for dep in graph.get(name, []):
            found = visit(dep, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    for name in sorted(graph):
        found = visit(name, [])
        if found:
            return found
    return None


#: pydantic's type errors, in the spec's words
_TYPES = {"int_type": "a whole number", "float_type": "a number", "string_type": "a string (quote it)",
          "bool_type": "true or false", "list_type": "a list", "dict_type": "a table", "model_type": "a table"}


#: pydantic's bound errors: the bound's key in its context, and how the spec says it
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _unquoted_fits(value: str, kind: str) -> bool:
    """Whether ``value`` without its quotes is what ``kind`` wants (``"2"`` for a number,
    ``"true"`` for a flag): only then is removing the quotes the fix."""
    if kind == "bool_type":
        return value in ("true", "false")
    if kind not in ("int_type", "float_type"):
        return False
    try:
        (int if kind == "int_type" else float)(value)
    except ValueError:
        return False
    return True


def describe_error(err: dict[str, Any]) -> str:
    """One of pydantic's validation errors in the spec's words (its key path, its camelCase names)."""
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        known = _known_keys(err["loc"])
        close = difflib.get_close_matches(key, known, n=1)
        suffix = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
        top = _known_keys(("x",))  # the spec's own keys
        if len(err["loc"]) > 1 and key in top and not close:
            suffix = f" (`{key}` is a key of the spec itself: put it above the first [section])"
        return f"{loc}: unknown key{suffix}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind in _TYPES:
        value = err.get("input")
        quoted = " (remove the quotes)" if isinstance(value, str) and _unquoted_fits(value, kind) else ""
        wanted = _TYPES[kind]
        if kind == "string_type" and isinstance(value, list):  # command = ["python3", "-m", ...]
            wanted = "a string: one command line, run by sh -c (join the words with spaces)"
        return f"{loc}: must be {wanted}, not {type(value).__name__} {value!r}{quoted}"
    if kind in _BOUNDS:  # memory = 64
        key, word = _BOUNDS[kind]
        bound = err["ctx"][key]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        unit = " MiB" if loc == "memory" else ""
        return f"{loc}: must be {word} {bound}{unit}, not {err.get('input')!r}"
    if kind == "string_too_short":
        return f"{loc}: must not be empty"
    if kind == "literal_error":  # arch = "arm64", restart = "on_failure"
        value = err.get("input")
        allowed = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        alias: str | None = ARCH_ALIASES.get(value.lower()) if isinstance(value, str) else None
        guess = alias or next(iter(difflib.get_close_matches(str(value), allowed, n=1)), None)
        choices = [repr(a) for a in allowed]
        either = " or ".join(choices) if len(choices) < 3 else f"{', '.join(choices[:-1])} or {choices[-1]}"
        return f"{loc}: must be {either}, not {value!r}" + (f" (did you mean {guess!r}?)" if guess else "")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg  # a check of the whole spec has no one key


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at the parent of ``loc``, in spec spelling."""
    parent = loc[:-1]
    model: type[BaseModel] = GuestSpec
    if len(parent) >= 2 and parent[0] == "services":
        model = Service
    elif len(parent) >= 2 and parent[0] == "healthChecks":
        model = HealthCheck
    return [f.alias or n for n, f in model.model_fields.items()]


def parse_spec(data: dict[str, Any], *, source: str) -> GuestSpec:
    try:
        return GuestSpec.model_validate(data, context=INPUT)
    except ValidationError as exc:
        errors = exc.errors()
        # an unknown key first; a misspelt one also makes its right spelling "missing": not said twice
        unknown = {(e["loc"][:-1], str(e["loc"][-1])) for e in errors if e["type"] == "extra_forbidden"}
        errors = [e for e in errors if not (e["type"] == "missing" and any(
            parent == e["loc"][:-1] and difflib.get_close_matches(str(e["loc"][-1]), [key], n=1)
            for parent, key in unknown))]
        errors = sorted(errors, key=lambda e: e["type"] != "extra_forbidden")
        problems = [describe_error(e) for e in errors]  # type: ignore[arg-type]
        first, rest = problems[0], problems[1:]
        raise SpecError(
            f"{source}: {first}" + (f" (and {len(rest)} more, below)" if rest else ""),
            hint="fix the key in the spec; see examples/hello/mvm.toml for the format",
            output="\n".join(rest) or None,
        ) from None


def spec_file(path: str | os.PathLike[str]) -> Path:
    """Accept either a directory holding mvm.toml or the file itself."""
    path = Path(path)
    candidate = path / "mvm.toml" if path.is_dir() else path
    if not path.exists():
        raise SpecError(f"{path.absolute()} does not exist",
                        hint="pass the directory that holds mvm.toml (or --flake for a Nix flake)")
    if not candidate.is_file():
        raise SpecError(
            f"no mvm.toml in {path.absolute()}",
            hint="pass the directory that holds mvm.toml (or --flake for a Nix flake)",
        )
    return candidate


def load_toml(path: str | os.PathLike[str]) -> GuestSpec:
    file = spec_file(path)
    try:
        data = tomllib.loads(file.read_bytes().decode())
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise SpecError(f"{file}: not UTF-8 text (byte {exc.object[exc.start]:#04x} on line {line})",
                        hint="TOML files are UTF-8: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{file}: not valid TOML: {exc}",
                        hint="strings need quotes (command = \"python3 -m http.server\"), tables a [header] "
                        "of their own; README.md shows a whole mvm.toml") from None
    except OSError as exc:
        raise SpecError(f"{file}: cannot read: {exc.strerror}") from None
    spec = parse_spec(data, source=str(file))
    for target, source in spec.files.items():
        where = file.parent / source
        try:
            mode = where.stat().st_mode
        except OSError:
            raise SpecError(
                f"{file}: files.{target!r}: {source!r} does not exist (paths are relative to mvm.toml)",
                hint=f"create {where} or fix the path",
            ) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would hang the build reading it
            raise SpecError(f"{file}: files.{target!r}: {source!r} is not a regular file or a directory",
                            hint="files copies files and directories into the image")
        if stat.S_ISDIR(mode) and (odd := _first_special(where)):
            raise SpecError(f"{file}: files.{target!r}: {odd} is not a regular file, directory or symlink",
                            hint="files copies files, directories and symlinks; remove it from "
                            f"{source!r} (a FIFO would hang the build reading it)")
    return spec


def _first_special(root: Path) -> Path | None:
    """The first entry under ``root`` that is a FIFO, socket or device (not followed: links)."""
    for parent, dirs, names in os.walk(root):
        for name in sorted([*dirs, *names]):
            mode = os.lstat(os.path.join(parent, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                return Path(parent, name)
    return None


def files_digest(spec: GuestSpec, base: Path) -> str:
    """A digest of the contents of ``spec.files`` (part of the image key)."""
    h = hashlib.sha256()
    for target, source in sorted(spec.files.items()):
        root = base / source
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in paths:
            h.update(f"{target}\0{p.relative_to(root) if root.is_dir() else ''}\0{p.stat().st_mode & 0o777}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()
