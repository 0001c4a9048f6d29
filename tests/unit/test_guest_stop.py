"""How PID 1 stops services (mvm.guest.supervisor.Supervisor.stop), with real processes under
a real reaper, in a Python of their own (as PID 1's threads are)."""

import subprocess
import sys

_STOP = """
import ctypes, sys, threading, time
from mvm.guest.reaper import Reaper
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans come to this reaper, as to PID 1
from mvm.guest.supervisor import Supervisor
reaper = Reaper()
threading.Thread(target=reaper.loop, daemon=True).start()
class Events:
    def emit(self, kind, **fields):
        if fields.get("msg"):
            print("event:", fields["msg"], flush=True)
stubborn = "python3 -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'"
services = {
    # not exec'd by sh: sh is the group's leader and ends on SIGTERM; python3 under it ignores it
    "wrapped": {"command": stubborn + "; echo after", "user": "root"},
    "polite": {"command": "sleep 60; echo after", "user": "root"},
    # put in the background: its shell (the group's leader) ends at once, the daemon lives on
    "daemon": {"command": "sleep 61 & echo started", "user": "root", "restart": "no"},
}
sup = Supervisor(services, reaper=reaper, events=Events(), env_overrides={}, handover_roots=[])
sup.start()
deadline = time.monotonic() + 20
while time.monotonic() < deadline and any(s["state"] not in ("running", "exited")
                                          for s in sup.status().values()):
    time.sleep(0.05)
time.sleep(1.0)  # python3 started under its shell
began = time.monotonic()
killed = sup.stop(1.5)
print("killed", killed, "after", round(time.monotonic() - began, 1), flush=True)
time.sleep(0.5)
import subprocess
print("left:", subprocess.run(["pgrep", "-f", "^python3 -c import signal, time; signal.signal"],
                              capture_output=True, text=True).stdout.split(), flush=True)
"""


def test_a_service_under_a_shell_that_ignores_sigterm_gets_its_grace_and_is_named() -> None:
    """`command = "python3 ... ; echo"` runs under `sh -c`, which ended on SIGTERM at once: the
    service counted as stopped, python3 (ignoring SIGTERM) got no grace, and down named nothing."""
    r = subprocess.run([sys.executable, "-c", _STOP], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "event: stop: service wrapped did not end within 1.5s of SIGTERM: killed" in lines, lines
    # the daemon of a service whose shell had ended got SIGTERM too, and ended on it: not named
    assert not any("service daemon" in line for line in lines), lines
    last = lines[-2].split()
    assert last[:2] == ["killed", "['wrapped']"] and float(last[-1]) >= 1.4, lines
    assert lines[-1] == "left: []", lines  # and then SIGKILLed, its shell gone or not


_DEPENDS = """
import ctypes, json, threading, time
from mvm.guest.reaper import Reaper
ctypes.CDLL(None).prctl(36, 1)
from mvm.guest.supervisor import Supervisor
reaper = Reaper()
threading.Thread(target=reaper.loop, daemon=True).start()
class Events:
    def emit(self, kind, **fields): pass
services = {
    "db": {"command": "sleep 60", "preStart": "exit 3", "user": "root"},
    "web": {"command": "sleep 60", "user": "root", "dependsOn": ["db"]},
    "edge": {"command": "sleep 60", "user": "root", "dependsOn": ["web"]},
    "flaky": {"command": "exit 1", "user": "root", "restart": "no"},  # ran once, then failed
    "after_flaky": {"command": "sleep 60", "user": "root", "dependsOn": ["flaky"]},
}
sup = Supervisor(services, reaper=reaper, events=Events(), env_overrides={}, handover_roots=[])
sup.start()
deadline = time.monotonic() + 20
while time.monotonic() < deadline and any(s["state"] in ("pending", "prestart") for s in sup.status().values()):
    time.sleep(0.05)
time.sleep(0.3)
print(json.dumps({n: [s["state"], s.get("reason")] for n, s in sup.status().items()}), flush=True)
sup.stop(1.0)
"""


def test_a_service_whose_dependency_failed_to_start_is_not_started() -> None:
    """guest.md: `dependsOn` starts a service after those it names have started. One whose
    dependency's preStart failed ran all the same."""
    import json

    r = subprocess.run([sys.executable, "-c", _DEPENDS], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    states = json.loads(r.stdout.splitlines()[-1])
    assert states["db"] == ["failed", "preStart exited with 3"]
    assert states["web"] == ["failed", "not started: it depends on db, which failed to start (preStart exited with 3)"]
    assert states["edge"][0] == "failed" and states["edge"][1].startswith("not started: it depends on web, which")
    assert states["flaky"][0] == "failed" and states["after_flaky"][0] == "running"  # it had started
