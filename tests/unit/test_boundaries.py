"""Architecture rules, checked on the source: who may import what."""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).parents[2] / "src" / "mvm"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add("." * node.level + (node.module or ""))
            elif node.module:
                names.add(node.module)
    return names


def test_guest_code_is_stdlib_only() -> None:
    for path in (SRC / "guest").glob("*.py"):
        for name in _imports(path):
            if name.startswith("."):
                assert name.count(".") == 1 or name == ".", f"{path.name} imports {name} outside mvm.guest"
                continue
            if name.startswith("mvm.guest."):  # entry.py, which runs as a script
                continue
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names, f"{path.name} imports non-stdlib {name}"


def test_only_the_cli_imports_typer_and_rich() -> None:
    for path in SRC.rglob("*.py"):
        if "cli" in path.relative_to(SRC).parts:
            continue
        for name in _imports(path):
            assert name.split(".")[0] not in ("typer", "rich", "click"), f"{path} imports {name}"


def test_errors_is_a_leaf() -> None:
    assert not [n for n in _imports(SRC / "errors.py") if n.startswith(".") or n.startswith("mvm")]


def test_build_initrd_is_standalone() -> None:
    """nix/flake.nix runs build/initrd.py as a script with a bare python3."""
    for name in _imports(SRC / "build" / "initrd.py"):
        assert not name.startswith("."), name
        assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__"


def test_export_is_leaf_ish() -> None:
    """mvm.export reads image dirs and writes files: it may use errors, _proc and _atomic,
    never the orchestration layer (_api, runtime, backends, cli), which can then call it."""
    allowed_mvm = {"..errors", ".._proc", ".._atomic", "mvm.errors", "mvm._proc", "mvm._atomic"}
    third_party = {"yaml", "jsonschema", "referencing"}
    for path in (SRC / "export").glob("*.py"):
        for name in _imports(path):
            if name.startswith(".."):
                assert name in allowed_mvm, f"{path.name} imports {name}"
            elif name.startswith("."):
                continue  # within mvm.export
            elif name.startswith("mvm"):
                assert name in allowed_mvm, f"{path.name} imports {name}"
            else:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in third_party, f"{path.name} imports {name}"
