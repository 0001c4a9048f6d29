"""README's quick start, run command by command as a user would (the installed `mvmctl`),
so the README cannot drift from what the product does."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from .conftest import CLI, ROOT, free_port

MVMCTL = Path(sys.executable).parent / "mvmctl"


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(mvmctl build examples/hello\n.*?)```", text, re.S)
    assert block, "README has no quick-start block starting with `mvmctl build examples/hello`"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_works_as_written(cli: CLI, hello_image: dict[str, Any], no_leaks: None) -> None:
    commands = quick_start()
    port = free_port()
    assert commands[0] == "mvmctl build examples/hello" and commands[-1] == "mvmctl down hello"
    try:
        for command in commands:
            argv = shlex.split(command.replace("8080:8080", f"{port}:8080").replace(":8080/", f":{port}/"))
            if argv[0] == "curl":
                with urllib.request.urlopen(argv[1], timeout=10) as resp:
                    assert resp.read().decode() == "<h1>Hello from mvm!</h1>\n"
                continue
            assert argv[0] == "mvmctl", command
            if "-f" in argv:  # follows for ever: show what is there, then stop it as a user would
                proc = subprocess.Popen([str(MVMCTL), *argv[1:]], env=cli.env, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                try:
                    out, _ = proc.communicate(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    out, _ = proc.communicate(timeout=10)
                assert "[service hello] running" in out, out
                continue
            r = subprocess.run([str(MVMCTL), *argv[1:]], env=cli.env, cwd=ROOT, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"{command}: {r.stderr}"
            if argv[1] == "ls":
                assert re.search(r"hello\s+running\s+healthy", r.stdout), r.stdout
            if argv[1] == "exec":
                assert "Debian" in r.stdout
    finally:
        cli("down", "hello", check=False)
