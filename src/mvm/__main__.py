"""`python -m mvm` is `mvmctl`."""

from .cli.app import main

main()
