"""mvmctl's exit codes, in one place (README.md lists them); :func:`mvm.cli.app.main`
maps the error hierarchy onto them."""

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BUG = 3
EXIT_TIMEOUT = 124
EXIT_BROKEN_PIPE = 120
EXIT_INTERRUPTED = 130
