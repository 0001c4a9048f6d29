"""The command tree ``main`` builds: only the named command's module, the same commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from mvm.cli import app


def _names(tree: typer.Typer) -> set[str]:
    group = typer.main.get_command(tree)
    return set(group.commands)  # type: ignore[attr-defined]


def test_every_command_maps_to_the_module_that_registers_it() -> None:
    seen: set[str] = set()
    for module in app.MODULES:
        names = _names(app.new_app((module,)))
        assert all(app.COMMANDS[name] == module for name in names), (module, names)
        seen |= names
    assert seen == set(app.COMMANDS) == _names(app.full_app())


@pytest.mark.parametrize(("args", "expected"), [
    (["ls"], {"ls"}),
    (["--debug", "volume", "ls"], {"volume"}),
    (["exec", "web", "--", "ls", "-la"], {"exec"}),
    (["resume", "web"], {"suspend", "resume"}),
])
def test_a_command_line_builds_only_its_command(args: list[str], expected: set[str]) -> None:
    assert _names(app.app_for(args)) == expected


@pytest.mark.parametrize("args", [[], ["--help"], ["bogus"], ["--version"]])
def test_help_unknown_commands_and_the_root_get_the_whole_tree(args: list[str]) -> None:
    assert app.app_for(args) is app.full_app()


def test_completion_gets_the_whole_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_MVMCTL_COMPLETE", "complete_bash")
    assert app.app_for(["ls"]) is app.full_app()


def test_a_command_imports_neither_other_commands_nor_rich() -> None:
    """``mvmctl exec`` and ``--json`` runs pay for no module they do not use (start-up time)."""
    code = ("import sys; from mvm.cli import app; app.app_for(['exec', 'web', '--', 'true']); "
            "print(sorted(m for m in sys.modules if m.startswith(('mvm.cli.commands.', 'rich'))))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "['mvm.cli.commands.exec_']"


def test_progress_off_a_terminal_is_plain_lines_without_rich() -> None:
    """In a pipe (scripts, CI) a stage is one line, and `up` reaches its machine without
    importing Rich first."""
    code = ("import sys; from mvm.cli.output import progress\n"
            "with progress('starting') as p: p.stage('resolving [x]')\n"
            "print(any(m.startswith('rich') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL)
    assert done.stdout.strip() == "False" and done.stderr == "starting: resolving [x]\n"


def test_up_loads_no_volume_export_code() -> None:
    """Every ``up`` imports the orchestration; only a volume seeded from a directory needs the
    export walker (a few ms of every start-up, restored ones included)."""
    code = "import sys, mvm._api.up; print('mvm.volumes.export' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "False"


def test_down_json_says_how_each_vm_went(tmp_path: Path) -> None:
    """Scripts get one record per name, the names that were not there included (exit 0: idempotent)."""
    r = subprocess.run([sys.executable, "-m", "mvm", "down", "--json", "ghost", "other"], capture_output=True,
                       text=True, env={**os.environ, "MVM_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"name": "ghost", "how": "not found"}, {"name": "other", "how": "not found"}]
    assert r.stderr == ""


def _mvmctl(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mvm", *args], capture_output=True, text=True,
                          env={**os.environ, "MVM_HOME": str(tmp_path), **env})


def test_every_name_is_tried_and_a_bad_one_is_reported_then_exit_1(tmp_path: Path) -> None:
    """As `docker rm a b c`: one bad name does not stop the rest, nor lose their report."""
    r = _mvmctl(tmp_path, "down", "--json", "ghost", "Bad/Name", "other")
    assert r.returncode == 1
    assert json.loads(r.stdout) == [{"name": "ghost", "how": "not found"}, {"name": "other", "how": "not found"}]
    assert "'Bad/Name'" in r.stderr and r.stderr.count("error:") == 1
    for command in (["rmi", "nosuch-a", "nosuch-b"], ["template", "rm", "0000aaaa", "1111bbbb"]):
        r = _mvmctl(tmp_path, *command)
        assert r.returncode == 1 and r.stderr.count("error:") == 2, r.stderr


@pytest.mark.parametrize("args", [["down"], ["forward", "ghost"], ["export", "."], ["export", ".", "--kubevirt"]])
def test_a_command_line_missing_what_the_command_needs_exits_2(tmp_path: Path, args: list[str]) -> None:
    """As README says: 2 when the command line lacks something, with the usage line."""
    r = _mvmctl(tmp_path, *args)
    assert r.returncode == 2 and r.stderr.startswith("Usage: mvmctl "), r.stderr


@pytest.mark.parametrize(("line", "cword", "expected"), [
    ("mvmctl up --hypervisor q", "3", ["qemu-kvm", "qemu-tcg"]),
    ("mvmctl build --arch a", "3", ["aarch64"]),
])
def test_options_with_fixed_choices_complete(tmp_path: Path, line: str, cword: str, expected: list[str]) -> None:
    r = _mvmctl(tmp_path, _MVMCTL_COMPLETE="complete_bash", COMP_WORDS=line, COMP_CWORD=cword)
    assert r.stdout.split() == expected, r.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["up", "--cpus", "abc"], "Invalid value for '--cpus': 'abc' is not a whole number"),
    (["logs", "x", "-n", "-1"], "'-1' must be at least 0"),
    (["stats", "--interval=0"], "Invalid value for '--interval': '0' must be at least 0.1"),
])
def test_a_refused_option_value_is_named_in_mvms_words(tmp_path: Path, args: list[str], expected: str) -> None:
    r = _mvmctl(tmp_path, *args)
    assert r.returncode == 2 and expected in r.stderr and "Input should be" not in r.stderr, r.stderr


def test_down_all_with_names_is_refused(tmp_path: Path) -> None:
    r = _mvmctl(tmp_path, "down", "--all", "ghost")
    assert r.returncode == 2 and "--all stops every VM: give either --all or the names" in r.stderr


@pytest.mark.parametrize(
    ("args", "env", "expected", "debug"),
    [
        (["ls", "--json", "--debug"], {}, ["--debug", "ls", "--json"], True),
        (["exec", "vm", "--", "sh", "--debug"], {}, ["exec", "vm", "--", "sh", "--debug"], False),
        (["ls"], {"MVM_DEBUG": "0"}, ["ls"], False),
        (["ls"], {"MVM_DEBUG": "false"}, ["ls"], False),
        (["ls"], {"MVM_DEBUG": "1"}, ["--debug", "ls"], True),
    ],
)
def test_debug_is_taken_anywhere_before_the_guest_command(args: list[str], env: dict[str, str],
                                                         expected: list[str], debug: bool) -> None:
    assert app.debug_first(args, env) == (expected, debug)


def test_help_names_arguments_without_python_types(capsys: pytest.CaptureFixture[str]) -> None:
    """`NAME  VMs to stop.`, not Typer 0.29's `NAME <list[str]>`, in every command's help; a
    required argument bare in the usage line (`exec [OPTIONS] NAME COMMAND...`)."""
    commands = [[name] for name in app.COMMANDS if name not in ("volume", "template")]
    commands += [["volume", "export"], ["volume", "rm"], ["template", "rm"]]
    for words in commands:
        with pytest.raises(SystemExit) as done:
            app.main([*words, "--help"])
        assert done.value.code == 0
        shown = capsys.readouterr().out
        assert "Usage: mvmctl" in shown
        for label in ("<str>", "<list[", "<Path>", "<int>"):
            assert label not in shown, (words, label, shown)
        assert "{" not in shown.splitlines()[0], shown  # `NAME`, not Typer 0.29's `{NAME}`


def test_help_examples_paste_into_a_shell(capsys: pytest.CaptureFixture[str]) -> None:
    """Every `mvmctl ...` example line in a help text is a command a shell runs as shown: a
    remark after it is a `# comment` (a `(remark)` was a syntax error when pasted)."""
    commands = [[name] for name in app.COMMANDS if name not in ("volume", "template")]
    commands += [["volume", sub] for sub in ("ls", "export", "rm")]
    commands += [["template", sub] for sub in ("create", "ls", "rm")]
    examples = []
    for words in commands:
        with pytest.raises(SystemExit):
            app.main([*words, "--help"])
        examples += [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("mvmctl ")]
    assert len(examples) > 20
    for line in examples:
        check = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
        assert check.returncode == 0, (line, check.stderr)


@pytest.mark.parametrize(("args", "expected"), [
    (["rm", "web"], "`mvmctl down NAME` stops a VM and removes it"),
    (["--debug", "ps"], "`mvmctl ls` lists VMs"),
    (["exec", "-it", "web", "sh"], "`mvmctl console NAME` opens an interactive shell"),
    (["exec", "-u", "mvm", "-t", "web", "sh"], "`mvmctl console NAME` opens an interactive shell"),
    (["exec", "web", "ls", "-la", "/tmp"], "put `--` before the command, so that its options are not taken for "
                                           "exec's: `mvmctl exec web -- ls -la /tmp`"),
    (["exec", "-u", "root", "web", "ls", "-la"], "`mvmctl exec -u root web -- ls -la`"),
    (["up", "examples/hello", "-d"], "up returns once the VM runs, in the background already: leave out -d"),
    (["version"], "`mvmctl --version` prints the version"),
])
def test_another_tools_words_get_mvmctls_equivalent(args: list[str], expected: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        app.main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "rmi'?" not in err  # not click's "Did you mean 'rmi'?"


def test_other_tools_words_never_shadow_a_command() -> None:
    assert not set(app.OTHER_TOOLS_WORDS) & set(app.COMMANDS)
    assert app.usage_hint(["exec", "web", "--", "ls", "-t"]) is None  # the guest command's own -t
    assert "put `--` before" in str(app.usage_hint(["exec", "web", "ls", "-t"]))  # after NAME: not a terminal


def test_nothing_mvmctl_writes_is_writable_by_others() -> None:
    """A caller's umask of 000 made the cache, its kernels and locks world-writable."""
    code = ("import os; os.umask(0o002); from mvm.cli.app import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(oct(os.umask(0)))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.split()[-1] == "0o22"  # group and others lose write, whatever the caller had
