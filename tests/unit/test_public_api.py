"""The public names of ``mvm``: what ``__all__`` promises, the lazy loader gives and the type
checker sees are the same names (they are listed apart: a name added to one list only would
be missing for someone)."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

import mvm
from mvm._api import models
from mvm.paths import Layout


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


def test_the_api_takes_the_forms_its_siblings_take_and_names_bad_input(tmp_path: Path) -> None:
    """Input one call accepts, its siblings accept too (a str path, an int or "8080" port,
    KEY=VALUE strings); input none accepts is a UsageError naming it, not a TypeError."""
    import mvm

    (tmp_path / "mvm.toml").write_text('name = "web"\n[services.web]\ncommand = "true"\n')
    assert mvm.load_toml(str(tmp_path)).name == "web"
    with pytest.raises(mvm.UsageError, match="ports=8080: give a list"):
        mvm.up(str(tmp_path), ports=8080)  # type: ignore[arg-type]
    out = tmp_path / "out"
    layout = Layout(state=tmp_path / "s", cache=tmp_path / "c")
    for bad, match in (({"ports": ["80x"]}, "port '80x' is not a port number"),
                       ({"ports": 8080}, "give a list of guest ports"),
                       ({"env": ['Q="x"']}, "mvm.env.Q cannot be passed on the kernel command line"),
                       ({"env": ["NOEQUALS"]}, "expected KEY=VALUE"),
                       ({"arch": "aarch64"}, "writes x86_64 .amd64. images only")):
        with pytest.raises(mvm.UsageError, match=match):  # all before a build (there is no spec here)
            mvm.export_kubevirt("nosuch", out=out, layout=layout, **bad)  # type: ignore[arg-type]
    with pytest.raises(mvm.UsageError, match="-o /etc/hostname/x: /etc/hostname is not a directory this user can"):
        mvm.export_kubevirt("nosuch", out="/etc/hostname/x", layout=layout, ports=["8080"], env=["A=1"])
    assert not out.exists()


def test_exec_input_goes_in_pieces_the_guest_takes() -> None:
    """`vm.exec(..., stdin=<13 MB>)` went as one message, over the guest's 16 MiB line limit:
    refused, and the command read an empty input. Every piece is now at most 64 KiB."""
    from mvm._api.vm import INPUT_CHUNK, _feed_stdin

    class Session:
        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.ended = False

        def send_stdin(self, data: bytes) -> None:
            self.sent.append(data)

        def send_input(self, kind: str) -> None:
            self.ended = kind == "eof"

    data = os.urandom(3 * INPUT_CHUNK + 5)
    for given in (data, [data[:10], data[10:]]):
        session = Session()
        _feed_stdin(session, given)  # type: ignore[arg-type]
        assert b"".join(session.sent) == data and session.ended
        assert max(map(len, session.sent)) <= INPUT_CHUNK


def test_help_and_dir_show_the_public_names() -> None:
    """PEP 562's lazy names were invisible to dir() and help(mvm) until first used."""
    import subprocess
    import sys

    assert {"up", "down", "VM", "cp", "MvmError"} <= set(dir(mvm))
    render = "import mvm, pydoc; print(pydoc.render_doc(mvm, renderer=pydoc.plaintext))"  # a fresh mvm: nothing loaded
    text = subprocess.run([sys.executable, "-c", render], capture_output=True, text=True, timeout=60).stdout
    assert "up(" in text and "class VM" in text, text[:2000]
