"""Architecture rules, checked on the source: who may import what.

Imports point one way, down this list (a module may import its own layer and the layers
below it, never one above):

    pytest         mvm.pytest_plugin, mvm.testing   the pytest plugin; imports only `mvm` and itself
    cli            mvm.cli.*, mvm.__main__          Typer/Rich; imports only `mvm` and mvm.cli
    public         mvm (the package's __init__)      the API users import
    orchestration  mvm._api.*                        sequences spec -> image -> backend -> registry
    export         mvm.export.*                      KubeVirt and OCI documents of an image
    runtime        mvm.runtime.*                     the VM registry, states, agent client, logs, templates
    stores         mvm.volumes.*, mvm.builders.*       the volume store and the builders and image store
    backends       mvm.backends.*                    own the machine; never import runtime
    leaf           mvm._proc, _atomic, _unixsock, _ext4, _untrusted, errors, paths, names, spec, guest.protocol,
                   guest.copy (the cp stream's rules, shared by both ends), guest.eventtext (how an
                   event reads, on the host's `logs` and a standalone guest's console)

The guest (mvm.guest.*) runs inside the VM on the guest's Python: stdlib only, and nothing
outside mvm.guest.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "mvm"

LAYERS = ["leaf", "backends", "stores", "runtime", "export", "orchestration", "public", "cli", "pytest"]
LEAVES = {"mvm._proc", "mvm._pids", "mvm._confine", "mvm._locks", "mvm._atomic", "mvm._ext4", "mvm._logshim",
          "mvm._unixsock", "mvm._untrusted", "mvm.errors", "mvm.paths", "mvm.names", "mvm.spec", "mvm.guest.protocol",
          "mvm.guest.copy", "mvm.guest.eventtext"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    if module in LEAVES:
        return "leaf"
    if module == "mvm":
        return "public"
    top = module.split(".")[1]
    return {"cli": "cli", "__main__": "cli", "_api": "orchestration", "runtime": "runtime", "volumes": "stores",
            "builders": "stores", "export": "export", "backends": "backends",
            "guest": "guest", "pytest_plugin": "pytest", "testing": "pytest"}.get(top, f"UNPLACED {module}")


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Absolute names of the mvm modules (and top-level packages) ``path`` imports."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate.startswith("mvm") and _exists(candidate) else base)
    return names


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in sources() if layer(module_name(p)).startswith("UNPLACED")]
    assert not unplaced, f"place these modules in a layer (tests/unit/test_boundaries.py): {unplaced}"


def test_imports_point_down() -> None:
    wrong = []
    for path in sources():
        me = module_name(path)
        mine = layer(me)
        if mine == "guest":
            continue
        for name in imports(path):
            if not name.startswith("mvm"):
                continue
            theirs = layer(name)
            if theirs == "guest":
                wrong.append(f"{me} ({mine}) imports guest code {name}")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{me} ({mine}) imports {name} ({theirs})")
    assert not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_backends_never_import_runtime_or_images() -> None:
    for path in (SRC / "backends").glob("*.py"):
        bad = [n for n in imports(path) if n.startswith(("mvm.runtime", "mvm.builders", "mvm.volumes", "mvm._api"))]
        assert not bad, f"{path.name} imports {bad}"


def test_the_cli_imports_only_the_public_api() -> None:
    for path in (SRC / "cli").rglob("*.py"):
        bad = [n for n in imports(path) if n.startswith("mvm") and n != "mvm" and not n.startswith("mvm.cli")]
        assert not bad, f"{path.relative_to(SRC)} imports {bad}: the CLI may use only `mvm` (the public API)"


def test_the_pytest_plugin_imports_only_the_public_api() -> None:
    """Like the CLI, the plugin is a user of `mvm`; and only it imports pytest."""
    plugin = {"mvm.pytest_plugin", "mvm.testing"}
    for path in sources():
        me = module_name(path)
        names = imports(path)
        if me in plugin:
            bad = [n for n in names if n.startswith("mvm") and n not in plugin | {"mvm"}]
            assert not bad, f"{me} imports {bad}: the pytest plugin may use only `mvm` (the public API)"
        else:
            assert not [n for n in names if n.split(".")[0] in ("pytest", "_pytest")], f"{me} imports pytest"
            assert not plugin & names, f"{me} imports the pytest plugin"


def test_guest_code_is_stdlib_only() -> None:
    for path in (SRC / "guest").glob("*.py"):
        for name in imports(path):
            if name.startswith("mvm"):
                assert name.startswith("mvm.guest"), f"{path.name} imports {name} outside mvm.guest"
                continue
            assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__", \
                f"{path.name} imports non-stdlib {name}"


def test_only_the_cli_imports_typer_and_rich() -> None:
    for path in sources():
        if "cli" in path.relative_to(SRC).parts:
            continue
        for name in imports(path):
            assert name.split(".")[0] not in ("typer", "rich", "click"), f"{path} imports {name}"


def test_leaves_import_only_leaves() -> None:
    for path in sources():
        if module_name(path) in LEAVES:
            bad = [n for n in imports(path) if n.startswith("mvm") and n not in LEAVES]
            assert not bad, f"{module_name(path)} is a leaf but imports {bad}"


@pytest.mark.parametrize("script", ["initrd.py", "vmlinux.py"])
def test_the_builders_nix_runs_as_scripts_are_standalone(script: str) -> None:
    """nix/flake.nix runs builders/initrd.py and builders/vmlinux.py as scripts with a bare python3."""
    for name in imports(SRC / "builders" / script):
        assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__", name


def test_no_module_is_over_450_lines() -> None:
    long = {module_name(p): n for p in sources() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these modules: {long}"


def test_export_imports_only_leaves() -> None:
    """mvm.export reads image dirs (through the image store's manifest reader) and writes
    files: it uses leaves and mvm.builders.store, never the orchestration layer, the VM
    runtime or the backends, so _api can call it."""
    third_party = {"yaml", "jsonschema", "referencing"}
    for path in (SRC / "export").glob("*.py"):
        for name in imports(path):
            if name.startswith("mvm"):
                assert name.startswith("mvm.export") or name in LEAVES | {"mvm.builders.store"}, \
                    f"{path.name} imports {name}"
            else:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in third_party or name == "__future__", \
                    f"{path.name} imports {name}"
