"""Service supervision: preStart once per boot, then the command, restarted with backoff.

Rules (documented in docs/guest.md):
- ``preStart`` runs once per boot, as root, under ``sh -c`` with the service's env, before
  the service first starts. A restart does not repeat it. If it fails the service is
  marked failed and not started, and so is every service that ``dependsOn`` it (a
  dependency that started once and then fails does not stop them: Compose's
  ``service_started``).
- Ownership hand-off: whatever ``preStart`` creates under ``/tmp`` or on a writable volume
  is handed to the service's user (files the service could not otherwise write to). The
  root of every writable volume belongs to the default service user.
- ``command`` runs under ``sh -c`` as ``user`` (default ``mvm``), in its own session, with
  the env from the spec, overridden by ``mvmctl up -e``.
- ``restart``: ``always`` (default), ``on-failure`` (non-zero exit or signal) or ``no``.
  Delays grow 0.5 s, 1 s, 2 s ... up to 30 s, and reset once a run lasted 10 s.
- A run that ends within those 10 s with the shell's "command not found" (127) or "cannot
  execute" (126) says so in ``reason`` (status and the service event), so that the host can
  tell at once that no health will come; the service restarts per its policy all the same
  (the program may yet arrive: a ``cp``, another service's preStart).
- A run the kernel's OOM killer ended (a SIGKILL the kernel log explains, :mod:`.oom`) says
  so in ``reason`` (status and the service event), and restarts like any other failure.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import threading
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

if TYPE_CHECKING:
    from typing import IO, Any

from . import handover
from .events import EventLog
from .oom import oom_kill_of
from .reaper import Exit, Reaper

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
BACKOFF_RESET_AFTER = 10.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def backoff_delay(consecutive_failures: int) -> float:
    return float(min(BACKOFF_CAP, BACKOFF_BASE * (2 ** max(0, consecutive_failures - 1))))


#: What ``sh -c`` exits with when it cannot run the program at all, and what to do about it.
_SHELL_CANNOT_RUN = {
    127: "command not found (exit 127): add the program's package to packages, or fix the path in command",
    126: "command cannot be executed (exit 126): check the file's execute bit and interpreter",
}


def cannot_run(code: int, ran_for: float) -> str | None:
    """Why a run that ended this way is likely to fail again on every restart, or None. Only
    a short run counts: a service that ran a while and then had a script of its own exit 127
    may be luckier next time."""
    return _SHELL_CANNOT_RUN.get(code) if ran_for < BACKOFF_RESET_AFTER else None


def should_restart(policy: str, code: int) -> bool:
    if policy == "always":
        return True
    if policy == "on-failure":
        return code != 0
    return False


class Identity:
    """Who a process runs as, resolved from /etc/passwd: by name, or by uid (``exec -u 1000``,
    as ``docker exec -u`` takes one; KeyError when the guest has no such user)."""

    def __init__(self, user: str) -> None:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        user = entry.pw_name
        self.name = user
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid
        self.home = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
        self.groups = sorted(
            {g for g in _supplementary_groups(user)} | {entry.pw_gid}
        )

    def marked(self, group: int) -> Identity:
        """This user with ``group`` as its only group (a preStart's mark: see handover)."""
        other = Identity.__new__(Identity)  # not `copy`: one import fewer at boot
        other.__dict__.update(self.__dict__, gid=group, groups=[])
        return other

    def popen_args(self) -> dict[str, Any]:
        if self.uid == 0 and self.gid == 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}


def _supplementary_groups(user: str) -> list[int]:
    import grp

    return [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]


def base_env(identity: Identity, path: str) -> dict[str, str]:
    return {
        "PATH": path,
        "HOME": identity.home,
        "USER": identity.name,
        "LOGNAME": identity.name,
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
    }


#: A longer output line of a service reaches the log in pieces of this size: PID 1 never
#: holds a whole line a service writes without an end (it would hold it in memory).
LINE_LIMIT = 64 * 1024


def pump_lines(stream: IO[bytes], events: EventLog, svc: str, name: str) -> None:
    for raw in iter(lambda: stream.readline(LINE_LIMIT), b""):
        events.log(svc, name, raw.decode(errors="replace").rstrip("\r\n"))
    stream.close()


class Service:
    def __init__(self, name: str, spec: dict[str, Any], sup: Supervisor) -> None:
        self.name = name
        self.spec = spec
        self.sup = sup
        self.state = "pending"
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.reason: str | None = None  # why it failed, or why its last run was killed (out of memory)
        self.started_at: float | None = None
        self.started = threading.Event()  #: set once it ran, or failed before it could
        self.ran = False  #: its command has started at least once this boot
        self.child: Exit | None = None
        self.thread = threading.Thread(target=self._run, name=f"svc-{name}", daemon=True)

    def status(self) -> dict[str, Any]:
        uptime = None
        if self.state == "running" and self.started_at is not None:
            uptime = round(time.monotonic() - self.started_at, 1)
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime": uptime,
            "user": self.spec.get("user", "mvm"),
            "restart": self.spec.get("restart", "always"),
            "reason": self.reason,
        }

    def _set_state(self, state: str, **extra: Any) -> None:
        self.state = state
        if state == "failed":
            self.reason = extra.get("reason") or f"exited with {extra.get('exit')}"
        self.sup.events.emit("service", svc=self.name, state=state, **extra)

    def _env(self, identity: Identity) -> dict[str, str]:
        env = base_env(identity, self.sup.path)
        env.update(self.spec.get("env") or {})
        env.update(self.sup.env_overrides)
        return env

    def _spawn(self, command: str, identity: Identity, stream_name: str) -> Exit:
        proc_kwargs: dict[str, Any] = identity.popen_args()
        child = self.sup.reaper.spawn(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(identity),
            cwd=identity.home,
            start_new_session=True,
            close_fds=True,
            **proc_kwargs,
        )
        proc = child.proc
        for pipe, label in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            assert pipe is not None
            tag = label if stream_name == "service" else f"{stream_name}:{label}"
            threading.Thread(
                target=pump_lines, args=(pipe, self.sup.events, self.name, tag), daemon=True
            ).start()
        return child

    def _hand_over(self, mark: int, user: Identity) -> None:
        """The preStart's files to the service's user (handover); what could not be handed
        over is said on the event log, and the service starts all the same."""
        try:
            _, left_out = handover.hand_over(self.sup.handover_roots, mark, user.uid, user.gid)
        except Exception as exc:  # the time bound, memory
            left_out = [repr(exc)]
        for what in left_out:
            self.sup.events.emit("init", msg=f"{self.name}: preStart's files not handed over: {what}")

    def _run(self) -> None:
        for dep in self.spec.get("dependsOn") or []:
            needed = self.sup.services[dep]
            needed.started.wait()
            if needed.state == "failed" and not needed.ran:  # its preStart failed, its user is missing ...
                self._set_state("failed", reason=f"not started: it depends on {dep}, which failed to start"
                                + (f" ({needed.reason})" if needed.reason else ""))
                self.started.set()
                return
        try:
            user = Identity(self.spec.get("user") or "mvm")
        except KeyError:
            self._set_state("failed", reason=f"user {self.spec.get('user')!r} does not exist")
            self.started.set()
            return
        pre = (self.spec.get("preStart") or "").strip()
        if pre and not self.sup.stopping.is_set():
            self._set_state("prestart")
            try:
                with self.sup.prestart_lock:  # one preStart at a time, as documented
                    if user.uid == 0:  # nothing to hand over: no mark to leave on its files
                        code = self._spawn(pre, Identity("root"), "preStart").wait()
                    else:
                        mark = handover.marker()
                        code = self._spawn(pre, Identity("root").marked(mark), "preStart").wait()
                        self._hand_over(mark, user)
            except OSError as exc:  # no /bin/sh, no memory to fork: the thread must not die with it
                self.last_exit = 127
                self._set_state("failed", reason=f"preStart could not start: {exc}", exit=127)
                self.started.set()
                return
            if code != 0:
                self.last_exit = code
                hopeless = cannot_run(code, 0.0) if code is not None else None
                reason = f"preStart exited with {code}" + (f": {hopeless}" if hopeless else "")
                self._set_state("failed", reason=reason, exit=code)
                self.started.set()
                return
        failures = 0
        policy = self.spec.get("restart") or "always"
        while not self.sup.stopping.is_set():
            began = time.monotonic()
            ended = self._run_once(user)
            if ended is None:  # stopped while it ran
                return
            code, cause = ended
            self.last_exit, self.reason = code, cause
            why = {"reason": cause} if cause else {}
            if not should_restart(policy, code):
                self._set_state("exited" if code == 0 else "failed", exit=code, **why)
                self.started.set()
                return
            failures = 1 if time.monotonic() - began >= BACKOFF_RESET_AFTER else failures + 1
            delay = backoff_delay(failures)
            self._set_state("backoff", exit=code, delay=delay, **why)
            self.started.set()  # it tried: dependents go ahead (Compose's service_started)
            if self.sup.stopping.wait(delay):
                self._set_state("stopped", exit=code)
                return
            self.restarts += 1

    def _run_once(self, user: Identity) -> tuple[int, str | None] | None:
        """One run of the command: its exit code and why it ended, if the code alone does not
        say (out of memory, a shell that cannot run it); None if the guest stopped meanwhile.
        A command whose shell cannot even start (no /bin/sh under a volume, no memory to fork)
        is a run that ended with 127, under the same restart policy."""
        try:
            self.child = self._spawn(self.spec["command"], user, "service")
        except OSError as exc:  # `started` is set once its state says how it ended (its dependents read it)
            return 127, f"could not start: {exc}"
        self.pid, self.ran = self.child.pid, True
        self.started_at = time.monotonic()  # not the wall clock: a restored clone's jumps to the host's
        began = time.monotonic()
        self._set_state("running", pid=self.pid, restarts=self.restarts)
        self.started.set()
        code = self.child.wait()
        assert code is not None
        killed = None if self.sup.stopping.is_set() else oom_kill_of(self.child.pid, user.uid, code, began)
        self.last_exit, self.pid = code, None
        if self.sup.stopping.is_set():
            self._set_state("stopped", exit=code)
            return None
        return code, killed or cannot_run(code, time.monotonic() - began)

    def signal(self, sig: int) -> None:
        """``sig`` to the service's process group, also once its leader has ended: what it put
        in the background (`prog &`, a daemon that forks and does not setsid) lives on there,
        and got no SIGTERM at `down`, only the SIGKILL after the grace."""
        child = self.child
        if child is not None:
            signal_group(child.pid, sig)


class Supervisor:
    def __init__(
        self,
        services: dict[str, dict[str, Any]],
        *,
        reaper: Reaper,
        events: EventLog,
        env_overrides: dict[str, str],
        handover_roots: list[str],
        path: str = DEFAULT_PATH,
    ) -> None:
        self.reaper = reaper
        self.events = events
        self.env_overrides = env_overrides
        self.handover_roots = handover_roots
        self.path = path
        self.stopping = threading.Event()
        self.prestart_lock = threading.Lock()
        self.services = {name: Service(name, spec, self) for name, spec in services.items()}

    def start(self) -> None:
        for svc in self.services.values():
            svc.thread.start()

    def status(self) -> dict[str, Any]:
        return {name: svc.status() for name, svc in self.services.items()}

    def stop(self, timeout: float = 5.0) -> list[str]:
        """TERM every service's process group, then KILL what is left after ``timeout``;
        return the services that had to be killed (each also said on the event log)."""
        self.stopping.set()
        for svc in self.services.values():
            svc.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = []
        for svc in self.services.values():
            child = svc.child
            # the whole group, not its leader: `sh -c` that did not exec its command ends on the
            # SIGTERM at once, and the program under it, which may ignore it, lived on unnamed
            if child is not None and not _group_ends(child, deadline):
                killed.append(svc.name)
                self.events.emit("init", msg=f"stop: service {svc.name} did not end within {timeout:g}s of "
                                 "SIGTERM: killed", service=svc.name)
        for svc in self.services.values():
            if svc.child is not None:  # the group, its leader gone or not
                signal_group(svc.child.pid, signal.SIGKILL)
        return killed


def signal_group(pgid: int, sig: int) -> None:
    """``sig`` to a process group (a service's, an exec'd command's); none left is no error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_ends(child: Exit, deadline: float) -> bool:
    """Whether every process of ``child``'s process group has ended by ``deadline`` (the reaper
    reaps them: the leader as PID 1's child, the rest as orphans it inherits)."""
    child.wait(max(0.0, deadline - time.monotonic()))
    while True:
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # not ours to ask (cannot happen as PID 1): as gone
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
