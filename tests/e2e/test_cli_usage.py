"""The installed ``mvmctl`` as a user meets it: usage errors print the usage line and a
hint and exit 2, never a traceback, under the oldest and the newest Typer that
pyproject.toml allows (scripts/setup.sh installs the oldest into .venv/compat)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

OLDEST = ROOT / ".venv" / "compat" / "typer-oldest"
MVMCTL = Path(sys.executable).parent / "mvmctl"
USAGE_ERRORS = [
    (["ls", "--bogus"], "No such option: --bogus"),
    (["status"], "Missing argument 'NAME'"),
    (["bogus"], "No such command 'bogus'"),
    (["up", ".", "--cpus", "two"], "Invalid value for '--cpus'"),
    (["logs", "hello", "-n", "abc"], "Invalid value for '-n'"),
]


@pytest.fixture(params=["newest", "oldest"])
def typer_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "MVM_HOME": str(tmp_path), "NO_COLOR": "1", "COLUMNS": "100"}
    if request.param == "oldest":
        assert (OLDEST / "typer").is_dir(), f"{OLDEST} is missing: run scripts/setup.sh"
        env["PYTHONPATH"] = str(OLDEST)
    version = subprocess.run([sys.executable, "-c", "import typer; print(typer.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert (version == "0.12.5") == (request.param == "oldest"), version
    return env


def mvmctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert shutil.which(str(MVMCTL)), f"{MVMCTL} is not installed"
    return subprocess.run([str(MVMCTL), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS)
def test_usage_errors_exit_2_with_the_usage_line(args: list[str], message: str, typer_env: dict[str, str]) -> None:
    r = mvmctl(*args, env=typer_env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "bug in mvm" not in r.stderr
    assert r.stderr.startswith("Usage: mvmctl") and message in r.stderr
    assert "-h' for help" in r.stderr


def test_help_and_version_work(typer_env: dict[str, str]) -> None:
    r = mvmctl("--version", env=typer_env)
    assert r.returncode == 0 and r.stdout.startswith("mvmctl ")
    r = mvmctl("up", "--help", env=typer_env)
    assert r.returncode == 0 and "-p" in r.stdout and "HOST:GUEST" in r.stdout


def test_shell_completion(typer_env: dict[str, str], tmp_path: Path) -> None:
    r = mvmctl("--show-completion", "bash", env=typer_env)
    assert r.returncode == 0 and "_mvmctl_completion" in r.stdout
    (tmp_path / "state" / "vms" / "web-1").mkdir(parents=True)
    env = {**typer_env, "_MVMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "mvmctl logs w", "COMP_CWORD": "2"}
    assert mvmctl(env=env).stdout.split() == ["web-1"]  # VM names complete
    env = {**env, "COMP_WORDS": "mvmctl rest", "COMP_CWORD": "1"}
    assert mvmctl(env=env).stdout.split() == ["restart"]
