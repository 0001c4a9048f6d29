"""Exit codes are named in one place (``mvm.cli.exitcodes``): no command spells one as a number."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

COMMANDS = Path(__file__).parents[2] / "src" / "mvm" / "cli" / "commands"


def test_no_command_exits_with_a_literal_error_code() -> None:
    found = []
    for path in sorted(COMMANDS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Exit"):
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                found += [f"{path.name}:{c.lineno}: {ast.unparse(node)}" for c in ast.walk(arg)
                          if isinstance(c, ast.Constant) and type(c.value) is int and c.value != 0]
    assert not found, "use the exit codes of mvm.cli.exitcodes (EXIT_ERROR, ...):\n" + "\n".join(found)



def test_a_second_interrupt_while_undoing_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two SIGINTs (`timeout -s INT` signals the process and its group; an impatient Ctrl-C):
    the second, raised while the first's undo ran or "interrupted" was printed, ended in a
    traceback and exit -2, the undo cut short."""
    from mvm.cli import app

    monkeypatch.setattr(app, "_interrupted", 0)
    with pytest.raises(KeyboardInterrupt):
        app._interrupt(2, None)
    app._interrupt(2, None)  # no KeyboardInterrupt: the undo goes on
    app._interrupt(15, None)
    assert app._interrupted == 2  # the exit code stays the first signal's (130)


@pytest.mark.parametrize(("disposition", "handled"), [("default", True), ("ignored", False)])
def test_a_hang_up_unwinds_like_an_interrupt_unless_nohup(disposition: str, handled: bool) -> None:
    """A closed terminal or a lost ssh session (SIGHUP) ended `up` at once, its VM left
    "starting" for good; under nohup (SIGHUP ignored) it is left ignored."""
    import subprocess
    import sys

    code = ("import signal, sys\n"
            f"signal.signal(signal.SIGHUP, signal.{'SIG_DFL' if disposition == 'default' else 'SIG_IGN'})\n"
            "from mvm.cli import app\n"
            "try:\n    app.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(signal.getsignal(signal.SIGHUP) is app._interrupt)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines()[-1] == str(handled), r.stderr
