"""The guest's clock follows the host's, also after the guest was paused.

While its QEMU is stopped (the host suspended, the host itself a VM its platform paused, a
QMP ``stop``), a guest's clock stands still, and afterwards it stays behind by the pause for
good: log times, TLS and tokens' validity, ``make``. The host's ``ping`` sets the clock, but
only when mvmctl talks to the guest. The RTC QEMU gives the guest (``-rtc clock=host``, its
default) reads the host's clock at every read, paused or not, so PID 1 looks at it now and
then and steps its clock when the two are apart by more than the RTC's whole seconds explain.

A clock set by hand in the guest is stepped back too: the guest's clock is the host's. (So
is the RTC: a guest program that writes it, `hwclock -w` or an NTP daemon's RTC sync, makes
the two disagree until QEMU's next start.) Stdlib only.
"""

from __future__ import annotations

import threading
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from collections.abc import Callable

RTC = "/sys/class/rtc/rtc0/since_epoch"
#: How often the clock is compared with the RTC: one small read, every this many seconds.
CHECK_EVERY = 10.0
#: The RTC counts whole seconds: a right clock reads up to one second apart from it.
TOLERANCE = 2.0
#: How often, while waiting for the RTC's next second, it is read.
EDGE_POLL = 0.005


def read_rtc(path: str = RTC) -> int:
    with open(path, "rb") as f:
        return int(f.read())


def _settime(t: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, t)


class Keeper:
    """Keeps the clock with the RTC. QEMU's RTC counts the host's seconds, but its seconds do
    not begin where the host's do: each QEMU process has its own phase (0.13 s in one VM,
    0.64 s in another). So once the host has set the clock exactly (its ``ping``), the keeper
    learns that phase at its next check, from one edge of the RTC's second, and sets a clock
    found astray to that edge plus the phase: exact to a few milliseconds. Before it knows the
    phase, the middle of the possible range: half a second off at most."""

    def __init__(self, read: Callable[[], int] = read_rtc, now: Callable[[], float] = time.time,
                 settime: Callable[[float], None] = _settime, sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.read, self.now, self.settime, self.sleep, self.monotonic = read, now, settime, sleep, monotonic
        #: seconds after the RTC's second turns that the host's second does; None: not known yet
        self.phase: float | None = None
        #: set when the host has just set the clock exactly: the next check measures the phase
        self.exact = threading.Event()

    def _edge(self) -> int | None:
        """Wait for the RTC's next second; its value, or None if none came (a starved vCPU)."""
        first = self.read()
        deadline = self.monotonic() + 1.5
        while (value := self.read()) == first:
            if self.monotonic() > deadline:
                return None
            self.sleep(EDGE_POLL)
        return value

    def check(self) -> float | None:
        """Measure the phase if the host set the clock since; then, if the clock is more than
        :data:`TOLERANCE` from the RTC, set it; return the step in seconds, or None."""
        if self.exact.is_set():
            self.exact.clear()
            if (edge := self._edge()) is not None and 0.0 <= (phase := self.now() - edge) < 1.0:
                self.phase = phase
        phase = 0.5 if self.phase is None else self.phase
        if abs(self.now() - (self.read() + phase + 0.5)) <= TOLERANCE:
            return None
        edge = self._edge()  # None: no edge came; the middle of the second the RTC shows
        target = self.read() + phase + 0.5 if edge is None else edge + phase
        step = target - self.now()
        if abs(step) <= TOLERANCE:
            return None  # set meanwhile (the host's ping, exact to the millisecond): left as it is
        self.settime(target)
        return step


def keep(stopping: threading.Event, report: Callable[[str], None], keeper: Keeper | None = None) -> None:
    """Check the clock with ``keeper`` every :data:`CHECK_EVERY` seconds until ``stopping``."""
    keeper = keeper or Keeper()
    failing = False
    while not stopping.wait(CHECK_EVERY):
        try:
            step = keeper.check()
        except FileNotFoundError:  # no RTC (a kernel without one): nothing to follow
            report("clock: the guest has no RTC; its clock is set only by the host's pings")
            return
        except (OSError, ValueError) as exc:  # a read that failed (the RTC mid-update): next time
            if not failing:
                report(f"clock: cannot read the RTC ({exc}); trying again every {CHECK_EVERY:g}s")
            failing = True
            continue
        failing = False
        if step is not None:
            report(f"clock: {abs(step):.1f} s {'behind' if step > 0 else 'ahead of'} the host's "
                   "(the VM was paused, or the clock set by hand); set to the host's")
