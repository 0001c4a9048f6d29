"""``mvmctl``: the command line. A thin layer over ``mvm``'s library API.

``main()`` is the only place where exceptions become exit codes:

    0    success
    1    a known mvm error (bad spec, port in use, VM not found, ...), printed with a hint
    2    command-line usage error
    3    a bug in mvm (traceback printed; please report it)
    120  stdout was closed early (e.g. `mvmctl ls | head`)
    124  `exec --timeout` expired
    130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM, 129 by SIGHUP (its terminal closed):
         what the command had started and not finished is undone (a VM whose start had
         finished keeps running)
    N    `exec` passes the guest command's exit code through
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import typer

from .exitcodes import EXIT_BROKEN_PIPE, EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_USAGE
from .options import click_exceptions
from .output import StdoutClosed

#: The command modules (in ``mvm.cli.commands``), in the order ``mvmctl --help`` lists their
#: commands. Imported by name, when a command line needs one: a run imports only its own.
MODULES: tuple[str, ...] = ("build", "up", "ls", "status", "stats", "logs", "exec_", "console", "cp", "forward",
                            "restart", "suspend", "down", "images", "template", "volume", "export", "dev",
                            "cleanup", "doctor")
#: Each command, and the module that registers it (with its siblings, if any).
COMMANDS: dict[str, str] = {
    "build": "build", "up": "up", "ls": "ls", "status": "status", "stats": "stats", "logs": "logs",
    "exec": "exec_", "console": "console", "cp": "cp", "forward": "forward", "restart": "restart",
    "suspend": "suspend", "resume": "suspend", "down": "down", "images": "images", "rmi": "images",
    "template": "template", "volume": "volume", "export": "export", "dev": "dev", "cleanup": "cleanup",
    "doctor": "doctor",
}


#: Commands of Docker, Lima or kubectl that mvmctl has under another name. Click would offer
#: the nearest spelling instead: `rm` would get `rmi`, which deletes images.
OTHER_TOOLS_WORDS: dict[str, str] = {
    **dict.fromkeys(("rm", "stop", "kill", "delete", "destroy"),
                    "`mvmctl down NAME` stops a VM and removes it (`mvmctl rmi` removes images)"),
    **dict.fromkeys(("ps", "list"), "`mvmctl ls` lists VMs"),
    **dict.fromkeys(("run", "start", "create"), "`mvmctl up [PATH]` builds if needed and starts a VM"),
    **dict.fromkeys(("inspect", "show", "describe"), "`mvmctl status NAME [--json]` shows one VM in detail"),
    **dict.fromkeys(("shell", "ssh", "attach"), "`mvmctl console NAME` opens a shell in a VM"),
    "top": "`mvmctl stats` shows what VMs use", "prune": "`mvmctl cleanup` removes what stopped VMs left",
    "pause": "`mvmctl suspend NAME` saves a VM to disk", "unpause": "`mvmctl resume NAME` brings it back",
    "log": "`mvmctl logs NAME`", "image": "`mvmctl images` lists images, `mvmctl rmi` removes them",
    "version": "`mvmctl --version` prints the version",
}


def _command_word(args: list[str]) -> str | None:
    return next((arg for arg in args if not arg.startswith("-")), None)


#: exec's options that take a value: the word after one is not the VM's name.
_EXEC_VALUED = frozenset({"-u", "--user", "-w", "--workdir", "-e", "--env", "--timeout"})


#: The parser's words for a value it refused (pydantic's, under Typer 0.29), and mvm's.
_REFUSALS = [
    (re.compile(r"Input should be a valid integer.*"), "is not a whole number"),
    (re.compile(r"Input should be a valid number.*"), "is not a number"),
    (re.compile(r"Input should be greater than or equal to (\S+)"), r"must be at least \1"),
    (re.compile(r"Input should be less than or equal to (\S+)"), r"must be at most \1"),
    (re.compile(r"Input should be greater than (\S+)"), r"must be more than \1"),
    (re.compile(r"Input should be less than (\S+)"), r"must be less than \1"),
]


def plain_refusal(message: str, opts: list[str], args: list[str]) -> str:
    """``Input should be a valid integer, ...`` as ``'abc' is not a whole number`` (click
    names the option before it): the value given (found in ``args``) and the rule, in the
    words of mvm's own errors."""
    for pattern, words in _REFUSALS:
        if pattern.fullmatch(message):
            rule = pattern.sub(words, message)
            break
    else:
        return message
    for i, arg in enumerate(args):
        for opt in opts:
            if arg == opt and i + 1 < len(args):
                return f"{args[i + 1]!r} {rule}"
            if arg.startswith(f"{opt}=") and opt.startswith("--"):
                return f"{arg.split('=', 1)[1]!r} {rule}"
    return f"the value {rule}"


def usage_hint(args: list[str]) -> str | None:
    """What to type instead, for a command line click refused that another tool takes."""
    word = _command_word(args)
    if word == "up" and {"-d", "--detach"} & set(args[:args.index("--")] if "--" in args else args):
        return "up returns once the VM runs, in the background already: leave out -d"
    if word != "exec":
        return None
    rest = args[args.index("exec") + 1:]
    options: list[str] = []
    options_given: list[str] = []  # with their values
    while rest and rest[0].startswith("-") and rest[0] != "--":  # exec's own, before NAME
        options.append(rest.pop(0))
        options_given.append(options[-1])
        if options[-1] in _EXEC_VALUED and rest:
            options_given.append(rest.pop(0))
    if {"-t", "-it", "-ti", "--tty"} & set(options):
        return "exec gives no terminal (there is no -t): `mvmctl console NAME` opens an interactive shell"
    if "--" not in args and len(rest) >= 2 and any(a.startswith("-") for a in rest[1:]):
        return (f"put `--` before the command, so that its options are not taken for exec's: "
                f"`mvmctl exec {shlex.join([*options_given, rest[0]])} -- {shlex.join(rest[1:])}`")
    return None


def command_module(name: str) -> ModuleType:
    """The module ``name`` of ``MODULES``, imported."""
    return importlib.import_module(f"{__package__}.commands.{name}")


def new_app(modules: tuple[str, ...] = MODULES) -> typer.Typer:
    """The ``mvmctl`` command tree, with the commands of ``modules``."""
    tree = typer.Typer(
        name="mvmctl",
        help="mvm: describe a guest, build it, and boot it as a real microVM that serves on localhost.\n\n"
        "Typical use:  mvmctl build examples/hello;  mvmctl up examples/hello -p 8080:8080;  "
        "mvmctl ls;  mvmctl logs hello -f;  mvmctl down hello.\n\n"
        "State lives under $MVM_HOME (default: the XDG state and cache dirs).",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    tree.callback()(_root)
    for name in modules:
        command_module(name).register(tree)
    return tree


@functools.cache
def full_app() -> typer.Typer:
    """The whole tree: for the top-level help, unknown commands and completion."""
    return new_app()


def app_for(args: list[str]) -> typer.Typer:
    """The tree ``args`` needs: only the named command's module when it names one (Typer
    inspects every command's signature to build a tree: ~25 ms of each run for all twenty),
    the whole tree for the top-level help, an unknown command (whose error lists the known
    ones) and shell completion."""
    name = _command_word(args)
    module = COMMANDS.get(name) if name is not None else None
    if module is None or "_MVMCTL_COMPLETE" in os.environ:
        return full_app()
    return new_app((module,))


def _version(value: bool) -> None:
    if value:
        from .. import __version__
        from . import output

        output.out.print(f"mvmctl {__version__}")
        raise typer.Exit()


def _root(
    debug: bool = typer.Option(False, "--debug", help="Log every step and show tracebacks."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


_interrupted = 0  #: the signal that interrupted the command, if one did


def raise_or_report_bug(debug: bool) -> None:
    """An unexpected exception (being handled): re-raised with --debug, else its traceback
    and a request to report it."""
    if debug:
        raise  # the exception the caller is handling
    import traceback

    from . import output

    traceback.print_exc()
    output.err.print("[bold red]This is a bug in mvm.[/] Please report it with the traceback above.")


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT, SIGTERM and SIGHUP unwind like Ctrl-C, so every cleanup (ExitStack) runs. A second
    one while that runs is ignored: raised in the middle of the undo (or of printing
    "interrupted"), it cut the undo short and ended in a traceback (`timeout -s INT` sends
    SIGINT to the process and its group: two). Every undo step has a time limit; SIGKILL
    still ends mvmctl at once."""
    global _interrupted
    if _interrupted:
        return
    _interrupted = signum
    raise KeyboardInterrupt


def usage_error_class() -> type[Exception]:
    """The base of the usage errors of the click that parses our command line (see
    :func:`mvm.cli.options.click_exceptions`)."""
    cls: type[Exception] = click_exceptions().ClickException
    return cls


def _plain_arguments(command: Any) -> Any:
    """``command`` with its arguments shown as every man page shows them: the help row is the
    metavar and help (``NAME  VMs to stop.``), and the usage line names a required one bare
    (``mvmctl exec [OPTIONS] NAME COMMAND...``). Typer 0.29 adds the Python type (``NAME
    <list[str]>``) and braces (``{NAME}``); older Typers have neither hook and print neither."""
    for param in command.params:
        if param.param_type_name != "argument":
            continue
        if hasattr(param, "display_type_rich"):
            param.display_type_rich = lambda ctx: None
        if hasattr(param, "_usage_display_name") and hasattr(param, "display_name_raw") and param.required:
            shown = param.display_name_raw + ("..." if param.nargs != 1 else "")
            param._usage_display_name = lambda shown=shown: shown
    for sub in getattr(command, "commands", {}).values():
        _plain_arguments(sub)
    return command


def debug_first(args: list[str], environ: Mapping[str, str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before ``--`` (``mvmctl ls --json --debug`` too), moved to where
    the parser takes it; or MVM_DEBUG set to anything but empty, 0, false or no."""
    end = args.index("--") if "--" in args else len(args)
    given = "--debug" in args[:end]
    rest = [a for a in args[:end] if a != "--debug"] + args[end:]
    from_env = environ.get("MVM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    debug = given or from_env
    return (["--debug", *rest] if debug else rest), debug


def main(argv: list[str] | None = None) -> None:
    from mvm import DiskFull, ExecTimeout, MvmError

    from .options import join_override_pairs

    global _interrupted
    _interrupted = 0  # a signal of an earlier main() in this process (the tests') is not this one's
    # Nothing mvm writes (state, cache, kernels, locks) is writable by other users, whatever
    # umask the caller had (a umask of 000 left the cached kernels world-writable).
    os.umask(os.umask(0o022) | 0o022)
    args, debug = debug_first(join_override_pairs(sys.argv[1:] if argv is None else argv), os.environ)
    if debug:
        from . import output

        output.debug = True
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not under nohup
        # the terminal closed, the ssh session lost: an `up` ended there left its VM "starting"
        signal.signal(signal.SIGHUP, _interrupt)
    word = _command_word(args)
    if word in OTHER_TOOLS_WORDS:  # none is an mvmctl command (a test says so)
        from mvm import UsageError

        from . import output

        output.render_error(UsageError(f"mvmctl has no command {word!r}",
                                       hint=f"{OTHER_TOOLS_WORDS[word]}; `mvmctl --help` lists every command"))
        raise SystemExit(EXIT_USAGE)
    command = _plain_arguments(typer.main.get_command(app_for(args)))
    usage_error = usage_error_class()
    code: object
    try:
        code = command.main(args=args, prog_name="mvmctl", standalone_mode=False)
        sys.stdout.flush()
    except MvmError as exc:
        from . import output

        output.render_error(exc)
        code = EXIT_TIMEOUT if isinstance(exc, ExecTimeout) else EXIT_ERROR
    except typer.Exit as exc:
        code = exc.exit_code
    except usage_error as exc:
        param = getattr(exc, "param", None)
        if param is not None and isinstance(getattr(exc, "message", None), str):
            exc.message = plain_refusal(exc.message, list(param.opts), args)  # type: ignore[attr-defined]
        exc.show()  # type: ignore[attr-defined]
        if hint := usage_hint(args):
            from . import output

            output.err.print(f"[yellow]hint:[/] {hint}")
        code = EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    except (BrokenPipeError, StdoutClosed):  # `mvmctl ls | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or debug:
            raise_or_report_bug(debug)
            code = EXIT_BUG
        else:  # what the command had started is undone already, as for any error
            from . import output

            where = f" writing {exc.filename}" if exc.filename else ""
            output.render_error(DiskFull(f"the disk is full ({exc.strerror}){where}"))
            code = EXIT_ERROR
    except Exception:
        raise_or_report_bug(debug)
        code = EXIT_BUG
    if _interrupted:
        # Typer turns KeyboardInterrupt into a silent exit code 130; the flag tells an
        # interrupt apart from a guest command that exited 130.
        from . import output

        starts_nothing = word in ("logs", "ls", "status", "stats", "images", "doctor", "console", "exec")
        with contextlib.suppress(OSError):  # a terminal that hung up (SIGHUP)
            output.err.print("[yellow]interrupted[/]" + ("" if starts_nothing else ": what it had started and not "
                                                        "finished is undone (`mvmctl ls` shows what runs)"))
        code = 128 + _interrupted
    raise SystemExit(code if isinstance(code, int) else 0)
