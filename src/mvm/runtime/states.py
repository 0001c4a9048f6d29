"""The states of a VM, defined once. Every command reads them from here.

A VM's status is *derived*, never trusted from a file: ``vm.json`` records a phase (what the
last command that touched the VM meant to happen) and the machine (pid and start time), and
the status follows from whether that machine still runs. docs/architecture.md has the same
table with what ``down``, ``cleanup`` and a new ``up`` of the same name do in each state.

=========  ===================================================================  =======================
status     meaning                                                              machine
=========  ===================================================================  =======================
starting   an ``up`` is booting it; the guest agent has not answered yet        running, or not yet
running    the guest agent answered; services are supervised                    running
stopping   a ``down`` is stopping it                                            running
exited     the guest powered itself off cleanly                                 gone
crashed    the machine ended without a clean power-off (killed, panic, QEMU      gone
           error), or an ``up`` died before the agent answered
broken     ``vm.json`` is unreadable; ``down`` still finds and stops its         unknown
           machine by its VM dir
suspended  ``suspend`` saved the machine to disk and stopped it; ``resume``       none (saved)
           brings it back as it was
=========  ===================================================================  =======================
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class VMStatus(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    CRASHED = "crashed"
    BROKEN = "broken"
    SUSPENDED = "suspended"

    @property
    def active(self) -> bool:
        """A machine runs (or is being started): ``cleanup`` leaves it alone, and ``up`` of
        the same name is refused until it is down."""
        return self in (VMStatus.STARTING, VMStatus.RUNNING, VMStatus.STOPPING)

    @property
    def kept(self) -> bool:
        """``cleanup`` leaves it alone: a machine runs, or is saved to be resumed."""
        return self.active or self is VMStatus.SUSPENDED


#: What ``vm.json`` records: the intent of the last command, not the truth.
Phase = Literal["starting", "running", "stopping", "suspended"]


def derive(phase: Phase, machine_alive: bool, owner_alive: bool, clean_poweroff: bool) -> VMStatus:
    """The status from the recorded phase and what is true now.

    ``owner_alive``: the ``up`` that reserved the VM still runs (it may not have started the
    machine yet). ``clean_poweroff``: the guest said it was powering off.
    """
    if machine_alive:
        if phase == "stopping":
            return VMStatus.STOPPING
        return VMStatus.RUNNING if phase == "running" else VMStatus.STARTING
    if phase == "starting" and owner_alive:
        return VMStatus.STARTING
    if phase == "suspended":
        return VMStatus.SUSPENDED
    return VMStatus.EXITED if clean_poweroff else VMStatus.CRASHED
