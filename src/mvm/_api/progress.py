"""How long-running calls report what they are doing. The CLI draws it with Rich; the
library default only logs."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("mvm")


class Progress(Protocol):
    def stage(self, name: str) -> None:
        """A new step began (``building the root filesystem``, ``booting (tcg)``)."""
        ...

    def line(self, text: str) -> None:
        """A line of output from the current step (a child process's progress)."""
        ...

    def note(self, text: str) -> None:
        """Something to keep in view, not just while a step runs: why a step is slow (an
        emulated build), work left running in the background."""
        ...


class Quiet:
    def stage(self, name: str) -> None:
        log.info("stage: %s", name)

    def line(self, text: str) -> None:
        log.debug("%s", text)

    def note(self, text: str) -> None:
        log.info("%s", text)
