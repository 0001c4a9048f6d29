"""`python -m mvm` is `mvmctl`."""

from .cli.entry import main

main()
