"""The public names of ``mvm``: what ``__all__`` promises, the lazy loader gives and the type
checker sees are the same names (they are listed apart: a name added to one list only would
be missing for someone)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import mvm
from mvm._api import models


def test_every_public_name_loads_and_is_seen_by_the_type_checker() -> None:
    for name in mvm.__all__:
        assert getattr(mvm, name) is not None, name
    assert set(mvm._LAZY) | {"templates", "dev", "paths"} == set(mvm.__all__) - set(mvm.errors.__all__)
    tree = ast.parse((Path(mvm.__file__)).read_text())
    checked = {alias.asname or alias.name
               for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
               for imp in node.body if isinstance(imp, ast.ImportFrom) for alias in imp.names}
    assert checked == set(mvm.__all__) - {"paths"} - set(mvm.errors.__all__)


def test_every_result_model_is_public() -> None:
    """A result's parts too (a CleanupReport's items, a DoctorReport's checks): a user types them."""
    defined = {name for name, value in vars(models).items()
               if isinstance(value, type) and value.__module__ == models.__name__ and not name.startswith("_")}
    assert defined <= set(mvm.__all__), defined - set(mvm.__all__)


def test_no_public_name_is_also_a_module_of_mvm() -> None:
    """Importing a submodule sets it as the package's attribute: `mvm.images()` was the
    `mvm.images` package once a build had imported it ('module' object is not callable)."""
    package = Path(mvm.__file__).parent
    modules = {p.stem for p in package.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert modules & set(mvm.__all__) == {"paths"}  # the one module that is public as a module
    importlib.import_module("mvm.builders.store")  # what a build imports
    assert callable(mvm.images)


def test_an_errors_hint_shows_in_its_traceback() -> None:
    """pytest's report of a test that raised an mvm error (and any traceback) shows its hint,
    also one set after the error was made (the pytest fixture's); str() stays the message."""
    import traceback

    import mvm

    err = mvm.HealthTimeout("web", "not healthy after 8s: web is unhealthy", hint="first")
    err.hint = "pytest --mvm-keep keeps a failed test's VMs running"
    shown = "".join(traceback.format_exception(err))
    assert "hint: pytest --mvm-keep keeps" in shown and "hint: first" not in shown
    assert str(err).endswith("not healthy after 8s: web is unhealthy") and "hint" not in str(err)
    err.hint = None
    assert "hint:" not in "".join(traceback.format_exception(err))
