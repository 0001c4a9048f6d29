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


def step_to_rtc(read: Callable[[], int] = read_rtc, now: Callable[[], float] = time.time,
                settime: Callable[[float], None] = lambda t: time.clock_settime(time.CLOCK_REALTIME, t),
                sleep: Callable[[float], None] = time.sleep) -> float | None:
    """If the clock is more than :data:`TOLERANCE` from the RTC, set it to the RTC's next
    second, the moment that second begins (the only exact time a whole-second clock gives);
    return the step in seconds, or None when the clock was right."""
    rtc = read()
    if abs(now() - rtc) <= TOLERANCE:
        return None
    deadline = time.monotonic() + 1.5
    while (edge := read()) == rtc and time.monotonic() < deadline:
        sleep(EDGE_POLL)
    step = edge - now()
    if abs(step) <= TOLERANCE:
        return None  # set meanwhile (the host's ping, exact to the millisecond): left as it is
    settime(float(edge))
    return step


def keep(stopping: threading.Event, report: Callable[[str], None],
         step_once: Callable[[], float | None] = step_to_rtc) -> None:
    """Compare the clock with the RTC every :data:`CHECK_EVERY` seconds until ``stopping``."""
    failing = False
    while not stopping.wait(CHECK_EVERY):
        try:
            step = step_once()
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
