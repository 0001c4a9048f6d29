"""PID 1 of every mvm guest. Stdlib only.

Boot order is chosen for time to first service: API filesystems, the guest model
(``/etc/mvm/guest.json``, baked at build) and the per-boot runtime config (a raw disk with
serial ``mvm-config``), network, volumes, then services. Health checks, the control channel
and the power button come up while the services start.

Standalone mode (``mvm.standalone=1`` on the kernel command line, or no config disk): the
guest runs without an mvm host, e.g. under KubeVirt. Per-boot settings come from the
kernel command line (``cmdline.py``), the network from DHCP (``dhcp.py``, in the
background, retried until it succeeds), and service logs and health transitions go to the
serial console as readable lines. Services, health checks and the power button work as
under ``mvmctl up``; with no agent channel there is no exec or console.

Shutdown (agent request, SIGTERM/SIGINT, busybox poweroff/halt (SIGUSR2/SIGUSR1), or the
ACPI power button): services get TERM, then
KILL after a grace period, everything is synced and unmounted, and the VM powers off.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import sys
import threading
import time

TYPE_CHECKING = False  # not `from typing`: importing typing costs ~35 ms at boot under TCG

from . import clock, cmdline, protocol, system
from .events import CLOCK_HOLD, EventLog, open_console
from .reaper import Reaper
from .signals import SignalDispatcher
from .supervisor import DEFAULT_PATH, Identity, Supervisor

if TYPE_CHECKING:
    from typing import Any

    from .health import HealthMonitor

GUEST_JSON = "/etc/mvm/guest.json"
KEY_POWER = 116
EV_KEY = 1
STOP_TIMEOUT = 5.0
#: How long ``configure`` waits for a clone to mount its volumes and start its services (the
#: host waits a little longer: mvm.runtime.templates.CONFIGURE_TIMEOUT).
CONFIGURE_TIMEOUT = 25.0


def say(msg: str) -> None:
    print(f"mvm-init: {msg}", flush=True)


def read_runtime_config() -> dict[str, Any] | None:
    """The config disk's document; None if there is no config disk (standalone)."""
    disks = system.wait_for_disks([protocol.CONFIG_DISK_SERIAL], timeout=2.0)
    dev = disks.get(protocol.CONFIG_DISK_SERIAL)
    if dev is None:
        return None
    with open(dev, "rb") as f:
        raw = f.read(protocol.CONFIG_DISK_BYTES).split(b"\0", 1)[0]
    return json.loads(raw) if raw.strip() else {}


def standalone_runtime(settings: dict[str, Any]) -> dict[str, Any]:
    """The runtime config of a guest without an mvm host: what the kernel command line
    says (``mvm.hostname``, ``mvm.env.*``); no volumes."""
    runtime: dict[str, Any] = {"env": dict(settings.get("env") or {})}
    if settings.get("vm"):
        runtime["vm"] = settings["vm"]
    return runtime


def mount_volumes(volumes: list[dict[str, Any]], owner: Identity | None) -> list[str]:
    """Mount each volume at its path; return the writable mount points.

    A volume that is missing or does not mount stops the boot: services must never start
    and write into the throwaway root filesystem where their data volume should be.
    Read-only volumes are ``ro,nosuid,nodev,noexec``; their owners and modes are baked into
    the image on the host. A writable volume's root belongs to the default service user
    (``0770`` if it is secret); on a volume created for this boot, so does every file
    seeded into it from the host.
    """
    if not volumes:
        return []
    disks = system.wait_for_disks([v["serial"] for v in volumes])
    writable: list[str] = []
    for vol in volumes:
        dev = disks.get(vol["serial"])
        if dev is None:
            raise OSError(f"volume {vol['serial']} for {vol['target']} did not appear")
        flags = system.MS_NOSUID | system.MS_NODEV
        if vol.get("readonly"):
            flags |= system.MS_RDONLY | system.MS_NOEXEC
        system.mount(dev, vol["target"], "ext4", flags)
        if vol.get("readonly"):
            continue
        writable.append(vol["target"])
        if owner is not None:
            if vol.get("fresh"):
                for dirpath, dirnames, filenames in os.walk(vol["target"]):
                    for name in dirnames + filenames:
                        os.lchown(os.path.join(dirpath, name), owner.uid, owner.gid)
            os.chown(vol["target"], owner.uid, owner.gid)
            # no setgid root (its owner could set it): a preStart's files below must keep the
            # preStart's group, which is how the hand-over knows them (guest/handover.py)
            os.chmod(vol["target"], stat.S_IMODE(os.stat(vol["target"]).st_mode) & ~stat.S_ISGID)
        if vol.get("secret"):
            os.chmod(vol["target"], 0o770)
    return writable


class Init:
    def __init__(self, signals: SignalDispatcher) -> None:
        self.signals = signals
        self.marks: dict[str, float] = {}
        self.reaper = Reaper()
        self._shutdown_lock = threading.Lock()
        self._shutting_down = False
        self.volumes: list[str] = []
        self.supervisor: Supervisor | None = None
        self.health: HealthMonitor | None = None  # started after the services
        self.events: EventLog | None = None
        self.guest: dict[str, Any] = {}
        self.standalone = False
        #: -e overrides: shared with the supervisor, health checks and exec (filled once known)
        self.env: dict[str, str] = {}
        self._configured = threading.Event()
        self._runtime: dict[str, Any] = {}
        #: set once a template clone's boot has applied its config (or failed to: _apply_error)
        self._applied = threading.Event()
        self._apply_error: str | None = None

    def boot(self) -> None:
        system.mount_early()
        with open(GUEST_JSON) as f:
            self.guest = json.load(f)
        settings = cmdline.settings(cmdline.read())
        ports = system.virtio_ports()
        runtime: dict[str, Any] | None = None
        self.keeper = clock.Keeper()  # the host's pings (control) tell it when the clock is exact
        if settings["template"]:
            # A template boot: be ready for the agent, and wait for the per-boot config. The
            # host saves the machine while it waits; every clone restored from it continues here.
            self.events = EventLog(ports.get(protocol.EVENT_PORT))
            self._static_network()
            self._start_control(ports)
            self.events.emit("init", msg="template: waiting for the per-boot config")
            self._configured.wait()
            runtime = self._runtime
            self.events.emit("init", msg="configured")
            try:
                self._start_services(runtime, settings, ports)
            except BaseException as exc:
                self._apply_error = f"the clone could not apply its config: {exc}"
                raise
            finally:
                self._applied.set()  # configure's reply: volumes mounted, services started
            return
        elif not settings["standalone"]:  # told so: do not wait for a config disk
            try:
                runtime = read_runtime_config()
            except (OSError, ValueError) as exc:
                say(f"runtime config unreadable, booting without it: {exc}")
                runtime = {}
        self._start_services(runtime, settings, ports)

    def _start_services(self, runtime: dict[str, Any] | None, settings: dict[str, Any],
                        ports: dict[str, str]) -> None:
        """Apply the per-boot config (hostname, volumes, env) and start the services, health
        checks and (unless a template clone's already runs) the control channel."""
        self.standalone = runtime is None
        if runtime is None:
            runtime = standalone_runtime(settings)
            say("standalone: no mvm host; network by DHCP, logs on the console")
        if self.events is None:
            console = open_console() if self.standalone else None
            # with a host, the boot's events wait for its first ping to make their times exact
            self.events = EventLog(ports.get(protocol.EVENT_PORT), console=console,
                                   hold=0.0 if self.standalone else CLOCK_HOLD)
        events = self.events
        # the spec's hostname, else the VM's name (`up --name`), else the spec's name
        hostname = self.guest.get("hostname") or runtime.get("vm") or self.guest.get("name")
        if hostname and system.valid_hostname(hostname):
            system.set_hostname(hostname)
        elif hostname:
            say(f"hostname {hostname!r} is not a hostname: left unset")
        try:
            owner: Identity | None = Identity("mvm")
        except KeyError:
            owner = None
        volumes = runtime.get("volumes") or []
        writable = mount_volumes(volumes, owner)
        self.volumes = [v["target"] for v in volumes]
        self.env.update(runtime.get("env") or {})
        path = self.guest.get("path") or DEFAULT_PATH
        services = self.guest.get("services") or {}
        self.supervisor = Supervisor(
            services,
            reaper=self.reaper,
            events=events,
            env_overrides=self.env,
            handover_roots=["/tmp", *writable],
            path=path,
        )
        self.supervisor.start()
        events.emit("init", msg="services started", **self.marks)
        # Everything below overlaps with the services' own start-up. The network can come
        # up after a service binds 0.0.0.0: forwarded connections only arrive once it is up.
        if self.standalone:
            threading.Thread(target=self._dhcp_network, name="dhcp", daemon=True).start()
        elif not settings["template"]:
            self._static_network()
        from .health import HealthMonitor

        self.health = HealthMonitor(
            self.guest.get("healthChecks") or {},
            services=services,
            reaper=self.reaper,
            events=events,
            env_overrides=self.env,
            path=path,
            started={name: svc.started for name, svc in self.supervisor.services.items()},
        )
        self.health.start()
        if not settings["template"]:
            self._start_control(ports)
        threading.Thread(target=self._watch_power_button, name="power", daemon=True).start()

        def report(msg: str) -> None:
            events.emit("init", msg=msg)

        threading.Thread(target=clock.keep, args=(self.supervisor.stopping, report, self.keeper), name="clock",
                         daemon=True).start()
        uptime = _uptime()
        events.emit("init", msg="ready", uptime=uptime)
        say(f"ready after {uptime:.2f}s uptime ({len(services)} services)")

    def _static_network(self) -> None:
        from . import net

        try:
            net.configure_network("10.0.2.15", "255.255.255.0", "10.0.2.2", "10.0.2.3")
        except OSError as exc:
            assert self.events is not None
            self.events.emit("init", msg=f"network set-up failed: {exc}")

    def _start_control(self, ports: dict[str, str]) -> None:
        from .control import ControlServer

        control_ports = [
            dev for name, dev in sorted(ports.items()) if name.startswith(protocol.CONTROL_PORT_PREFIX)
        ]
        ControlServer(
            control_ports,
            reaper=self.reaper,
            status=self.status,
            shutdown=self.shutdown,
            configure=self.configure,
            env_overrides=self.env,
            path=self.guest.get("path") or DEFAULT_PATH,
            signals=self.signals,
            clock_set=self._clock_exact,
        ).start()

    def _clock_exact(self) -> None:
        """The host's ping has set the clock: the keeper learns the RTC's phase from it, and
        the boot's first events get their exact times."""
        self.keeper.exact.set()
        if self.events:
            self.events.clock_exact()

    def configure(self, doc: dict[str, Any]) -> str | None:
        """The per-boot config of a clone restored from a template (the agent's ``configure``);
        returns an error, or None. Accepted once, and only while the boot waits for it. It
        returns once the boot has applied it (volumes mounted, services started), so that
        what the host runs next (``exec``, a health wait) finds the clone as a boot leaves it."""
        if self._configured.is_set():
            return "already configured"
        self._runtime = doc
        self._configured.set()
        if not self._applied.wait(CONFIGURE_TIMEOUT):
            return f"the clone did not apply its config within {CONFIGURE_TIMEOUT:.0f} s"
        return self._apply_error

    def _dhcp_network(self) -> None:
        """Standalone: bring up the first interface and keep a DHCP lease on it, for ever.
        A service bound to 0.0.0.0 gets traffic as soon as the address is set."""
        from . import dhcp, net

        events = self.events
        assert events is not None
        stopping = threading.Event()
        try:
            net.link_up("lo")
            ifaces = net.interfaces()
            if not ifaces:
                events.emit("init", msg="network: no interface")
                return
            ifname = ifaces[0]
            net.link_up(ifname)
            client = dhcp.Client(dhcp.UdpTransport(ifname), net.mac_address(ifname))
        except OSError as exc:
            events.emit("init", msg=f"network set-up failed: {exc}")
            return

        def apply(lease: dhcp.Lease) -> None:
            net.configure_lease(ifname, lease.address, lease.netmask, lease.router, lease.dns, lease.search,
                                lease.mtu)

        delay = 1.0
        while True:
            try:
                lease = client.acquire()
                apply(lease)
                break
            except OSError as exc:
                events.emit("init", msg=f"network: DHCP on {ifname} failed: {exc}; retrying in {delay:g}s")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        events.emit("init", msg=f"network: {ifname} {lease.describe()}")
        say(f"network: {ifname} {lease.describe()}")

        def report(msg: str) -> None:
            events.emit("init", msg=f"network: {msg}")

        def apply_quietly(new: dhcp.Lease) -> None:
            try:
                apply(new)
            except OSError as exc:
                report(f"applying the new lease failed: {exc}")

        dhcp.keep_lease(client, lease, apply=apply_quietly, report=report, sleep=stopping.wait)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.guest.get("name"),
            "uptime": _uptime(),
            "services": self.supervisor.status() if self.supervisor else {},
            "health": self.health.status() if self.health else {},
            "shutting_down": self._shutting_down,
        }

    def shutdown(self, grace: float = protocol.STOP_GRACE) -> None:
        """Stop the services (SIGTERM, SIGKILL after ``grace`` s), the rest, sync, unmount and
        power off. What was written before it began is synced first: if the host gives up
        waiting (`down --timeout`) and ends the machine, only writes during the stop are lost."""
        with self._shutdown_lock:
            if self._shutting_down:
                return
            self._shutting_down = True
        say("shutting down")
        os.sync()
        if self.events:
            self.events.emit("init", msg="shutting down", grace=grace)
        if self.health:
            self.health.stop()
        if self.supervisor:
            self.supervisor.stop(grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(-1, sig)  # every process but PID 1
            except ProcessLookupError:
                break
            time.sleep(0.2)
        os.sync()
        for target in reversed(self.volumes):
            try:
                system.umount(target)
            except OSError:
                system.umount(target, lazy=True)
        if self.events:
            self.events.emit("init", msg="powering off")
            self.events.flush()
        say("powering off")
        system.power_off()

    def _watch_power_button(self) -> None:
        """Read evdev devices for KEY_POWER (QMP system_powerdown → ACPI button)."""
        fmt = "llHHi"
        size = struct.calcsize(fmt)
        try:
            devices = [f"/dev/input/{d}" for d in os.listdir("/dev/input") if d.startswith("event")]
        except OSError:
            return
        fds = []
        for dev in devices:
            try:
                fds.append(os.open(dev, os.O_RDONLY))
            except OSError:
                continue
        import select

        while fds:
            ready, _, _ = select.select(fds, [], [])
            for fd in ready:
                data = os.read(fd, size * 16)
                for off in range(0, len(data) - size + 1, size):
                    _, _, etype, code, value = struct.unpack_from(fmt, data, off)
                    if etype == EV_KEY and code == KEY_POWER and value == 1:
                        self.shutdown()


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def main(started: float | None = None) -> None:
    """``started``: when the interpreter began running the entry script (seconds since boot)."""
    imported = time.monotonic()
    if os.getpid() != 1:
        print("mvm-init must run as PID 1 inside an mvm guest", file=sys.stderr)
        raise SystemExit(2)
    signals = SignalDispatcher()
    init = Init(signals)

    def on_stop_signal() -> None:
        threading.Thread(target=init.shutdown, name="shutdown", daemon=True).start()

    signals.subscribe(signal.SIGTERM, on_stop_signal)
    signals.subscribe(signal.SIGINT, on_stop_signal)  # Ctrl-Alt-Del
    # busybox `poweroff` and `halt` ask PID 1 with SIGUSR2 and SIGUSR1 (sysvinit's convention)
    signals.subscribe(signal.SIGUSR2, on_stop_signal)
    signals.subscribe(signal.SIGUSR1, on_stop_signal)
    init.marks = {"python_ready": round(started or imported, 3), "init_imported": round(imported, 3)}
    try:
        init.boot()
    except Exception as exc:  # PID 1 must never exit: report and power off
        import traceback

        traceback.print_exc()
        say(f"boot failed: {exc}")
        if init.events:
            init.events.emit("init", msg=f"boot failed: {exc}")
            init.events.flush()
        system.power_off()
    init.reaper.loop()
