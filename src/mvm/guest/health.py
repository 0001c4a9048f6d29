"""Health checks run by the guest agent.

Each check runs ``healthCmd`` under ``sh -c`` (as the user of the service with the same
name, else ``mvm``), killing it after ``healthTimeoutSecs``. States:

- ``starting``: no check has passed yet and the grace period has not run out. Until the
  first pass, checks run every ``min(1 s, interval)`` so ``up --wait`` returns promptly,
  at a lower CPU priority (``STARTING_NICE``) so that they do not slow the start they wait for.
- ``healthy``: the last check passed.
- ``unhealthy``: the last check failed after ``startupGraceSecs``.

Every transition is emitted on the event stream, so ``mvmctl logs`` shows it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import IO, Any

from .events import EventLog
from .reaper import Reaper
from .supervisor import Identity, base_env

OUTPUT_LIMIT = 2048
FAST_PROBE = 1.0
#: The niceness of a check's command while the check is ``starting``: its probes then run on
#: the CPU its service leaves. On one vCPU under TCG, probes at full priority (a `curl` a
#: second) slowed the hello example's first answer after a restore from 2.03 s to 2.59 s; at
#: niceness 10, 2.40 s; at 19, 2.25 s (medians of 5, against the same guest without a check).
#: Once the check has passed (or failed for good) its commands run at normal priority again,
#: so a busy service's checks are not starved into timeouts.
STARTING_NICE = 19


def _read_tail(stream: IO[bytes], out: list[bytes]) -> None:
    """Read ``stream`` to its end, keeping only its last ``OUTPUT_LIMIT`` bytes (a check that
    prints without end must not grow PID 1)."""
    tail = b""
    while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
        tail = (tail + chunk)[-OUTPUT_LIMIT:]
    out.append(tail)


def probe_nice(state: str) -> int:
    return STARTING_NICE if state == "starting" else 0


def _set_thread_nice(value: int) -> None:
    """This thread's niceness (a child it forks inherits it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError:
        pass


def next_state(state: str, passed: bool, in_grace: bool) -> str:
    if passed:
        return "healthy"
    if in_grace and state == "starting":
        return "starting"
    return "unhealthy"


class Check:
    def __init__(self, name: str, spec: dict[str, Any], mon: HealthMonitor) -> None:
        self.name = name
        self.spec = spec
        self.mon = mon
        self.state = "starting"
        self.last_exit: int | None = None
        self.last_output = ""
        self.checked_at: float | None = None
        self.failures = 0
        self.thread = threading.Thread(target=self._loop, name=f"health-{name}", daemon=True)

    @property
    def interval(self) -> float:
        return float(self.spec.get("healthIntervalSecs", 30))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("healthTimeoutSecs", 10))

    @property
    def grace(self) -> float:
        grace = self.spec.get("startupGraceSecs")
        return self.interval if grace is None else float(grace)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "last_exit": self.last_exit,
            "last_output": self.last_output,
            "checked_at": self.checked_at,
            "failures": self.failures,
            "interval": self.interval,
        }

    def _run_once(self) -> tuple[int, str]:
        svc = self.mon.services.get(self.name) or {}
        try:
            ident = Identity(svc.get("user") or "mvm")
        except KeyError:
            ident = Identity("root")
        env = base_env(ident, self.mon.path)
        env.update(svc.get("env") or {})
        env.update(self.mon.env_overrides)
        try:
            child = self.mon.reaper.spawn(
                ["/bin/sh", "-c", self.spec["healthCmd"]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ident.home,
                start_new_session=True,
                **ident.popen_args(),
            )
        except OSError as exc:  # no /bin/sh (a volume over it), no memory to fork: a failed probe
            return 127, f"cannot start the probe: {exc}"
        out: list[bytes] = []
        assert child.proc.stdout is not None
        reader = threading.Thread(target=_read_tail, args=(child.proc.stdout, out), daemon=True)
        reader.start()
        code = child.wait(self.timeout)
        if code is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait(2)
            reader.join(1)
            return 124, f"timed out after {self.timeout:g}s"
        reader.join(1)
        text = b"".join(out).decode(errors="replace").strip()
        return code, text[-OUTPUT_LIMIT:]

    def _loop(self) -> None:
        started = time.monotonic()
        svc = self.mon.supervisor_started.get(self.name)
        if svc is not None:  # don't compete with the service's own start-up
            svc.wait(self.grace or self.interval)
        while not self.mon.stopping.is_set():
            _set_thread_nice(probe_nice(self.state))
            code, output = self._run_once()
            if self.mon.stopping.is_set():
                return
            in_grace = time.monotonic() - started < self.grace
            passed = code == 0
            self.failures = 0 if passed else self.failures + 1
            self.last_exit, self.last_output, self.checked_at = code, output, time.time()
            new = next_state(self.state, passed, in_grace)
            if new != self.state:
                self.state = new
                self.mon.events.emit(
                    "health", check=self.name, state=new, exit=code, failures=self.failures,
                    output=output[-400:],
                )
            fast = self.state == "starting"
            self.mon.stopping.wait(min(FAST_PROBE, self.interval) if fast else self.interval)


class HealthMonitor:
    def __init__(
        self,
        checks: dict[str, dict[str, Any]],
        *,
        services: dict[str, dict[str, Any]],
        reaper: Reaper,
        events: EventLog,
        env_overrides: dict[str, str],
        path: str,
        started: dict[str, threading.Event] | None = None,
    ) -> None:
        self.supervisor_started = started or {}
        self.services = services
        self.reaper = reaper
        self.events = events
        self.env_overrides = env_overrides
        self.path = path
        self.stopping = threading.Event()
        self.checks = {name: Check(name, spec, self) for name, spec in checks.items()}

    def start(self) -> None:
        for check in self.checks.values():
            check.thread.start()

    def status(self) -> dict[str, Any]:
        return {name: c.status() for name, c in self.checks.items()}

    def stop(self) -> None:
        self.stopping.set()
