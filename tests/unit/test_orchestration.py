"""The orchestration (``mvm._api``), driven through the fake backend: no VM, no QEMU.

The real registry, agent client (over real unix sockets, answered by the fake guest),
volume code (real mkfs) and undo stack run; only the machine is fake. What a boot really
does is proven by the end-to-end tests.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mvm
from mvm import backends
from mvm._api.launch import Launch
from mvm._api.models import CleanupItem
from mvm._api.template_maker import make_template
from mvm._api.templates import mode as templates_mode
from mvm._proc import DEFAULT_RUNNER, Runner
from mvm.backends.base import MachineRef, PortForward
from mvm.backends.fake import FakeBackend
from mvm.builders.store import Image, ImageStore
from mvm.errors import (
    BootError,
    HealthTimeout,
    PortInUse,
    ServiceFailed,
    StateError,
    StopFailed,
    UsageError,
    VMError,
    VMExists,
    VMNotFound,
)
from mvm.paths import Layout, VMFiles
from mvm.runtime.registry import Registry
from mvm.runtime.templates import Template, TemplateStore
from mvm.volumes.store import VolumeStore, volume_id


def launch_steps() -> list[str]:
    """The steps ``Launch.run`` calls (``self.<step>(...)``), in order, read from its source:
    a step added there is failed by the test below without anyone listing it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Launch.run)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    steps = [c.func.attr for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))
             if isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name) and c.func.value.id == "self"]
    return list(dict.fromkeys(steps))


STEPS = launch_steps()


def test_the_steps_failed_in_turn_are_the_ones_the_architecture_doc_names() -> None:
    """Checks the reading of ``Launch.run`` above (it found every step, in order), and that
    docs/architecture.md's `up` chain says what the code does."""
    doc = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    chain = doc.split("→ `Launch.run()`:")[1].split("```")[1]
    assert [step.strip() for step in chain.split("→")] == STEPS
    assert {"create_root", "personalize", "open_forwards", "record_launch"} <= set(STEPS)


def _up(layout: Layout, fake: FakeBackend, image: Image, **kwargs: object) -> mvm.VM:
    return mvm.up(image=image, layout=layout, backend=fake, boot_timeout=5, **kwargs)  # type: ignore[arg-type]


def _nothing_left(layout: Layout, fake: FakeBackend) -> None:
    # a VM's name never starts with "."; the VMs' lock files live in vms/.locks
    assert not (layout.vms.exists() and [p for p in layout.vms.iterdir() if not p.name.startswith(".")]), \
        "a VM dir was left behind"
    assert not [m for m in fake.machines.values() if m.running], "a machine was left running"
    assert mvm.ls(layout=layout) == []


def test_up_forward_exec_down(layout: Layout, fake: FakeBackend, image: Image,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # the same on a 1-CPU machine
    vm = _up(layout, fake, image, ports=["18080:8080"], env=["MODE=test"], cpus=2)
    info = vm.info()
    assert info.status is mvm.VMStatus.RUNNING and info.health == "healthy"
    assert (info.name, info.backend, info.accel, info.cpus, info.memory) == ("web", "fake", "tcg", 2, 512)
    (machine,) = fake.machines.values()
    asked = [m["op"] for m in machine.guest.requests].count("status")
    assert asked >= 1  # info() above asked
    unasked = vm.info(ask_guest=False).model_dump(exclude={"uptime"})
    assert [m["op"] for m in machine.guest.requests].count("status") == asked  # no round trip
    assert unasked == {**info.model_dump(exclude={"uptime"}), "health": "unknown"}
    assert [str(p) for p in info.ports] == ["127.0.0.1:18080->8080/tcp"] and info.env_keys == ["MODE"]
    config = json.loads(vm.files.config_disk.read_bytes().rstrip(b"\0"))
    assert config["env"] == {"MODE": "test"} and config["vm"] == "web"

    added = vm.forward("19090:9090")
    assert machine.forwards == [PortForward(18080, 8080), PortForward(19090, 9090)]
    assert [p.host_port for p in vm.info().ports] == [18080, 19090] and added.guest_port == 9090
    with pytest.raises(UsageError, match="already forwarded"):
        vm.forward("19090:9091")

    picked = vm.forward("7070")  # a free host port is picked
    assert picked.host_port >= 40_000 and picked.guest_port == 7070
    assert vm.unforward(f"{picked.host_port}:7070").host_port == picked.host_port
    assert 7070 not in [p.guest_port for p in vm.info().ports]
    with pytest.raises(UsageError, match="no forward from host port"):
        vm.unforward("1:2")
    picked = vm.forward(7070)  # an int, as up's ports take it
    assert vm.unforward(7070).host_port == picked.host_port  # as `-p 7070` added it: by guest port
    with pytest.raises(UsageError, match="no forward to guest port 7070/tcp"):
        vm.unforward("7070")
    vm.forward("17071:7071")
    vm.forward("17072:7071")
    with pytest.raises(UsageError, match="2 forwards to guest port 7071/tcp, from 127.0.0.1:17071, 127.0.0.1:17072"):
        vm.unforward("7071")
    vm.unforward("17071:7071")
    vm.unforward("17072:7071")

    result = vm.exec(["echo", "hi"])
    assert (result.exit_code, result.stdout) == (0, b"echo hi\n")
    assert vm.guest_status().health == "healthy"

    assert vm.down().how == "shut down cleanly"
    _nothing_left(layout, fake)
    with pytest.raises(VMNotFound):
        mvm.down("web", layout=layout)


@pytest.mark.parametrize("boot", ["cold", "restored"])
@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_any_step_of_up_leaves_nothing(step: str, boot: str, layout: Layout, fake: FakeBackend,
                                                    image: Image, tmp_path: Path, request: pytest.FixtureRequest,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step fails after doing its work. With a volume, -e and -p every step has work to do
    (a restored clone's: ``personalize`` hot-plugs the volume and sends ``configure``)."""
    template: Template | None = None
    if boot == "restored":
        from mvm.builders.store import ImageStore

        template = request.getfixturevalue("template")
        monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)
    original = getattr(Launch, step)
    done: list[str] = []

    def fail_after(self: Launch, *args: object) -> object:
        original(self, *args)
        done.append(step)
        raise RuntimeError(f"injected after {step}")

    monkeypatch.setattr(Launch, step, fail_after)
    (tmp_path / "data").mkdir()
    with pytest.raises(RuntimeError, match="injected"):
        _up(layout, fake, image, volumes=[f"{tmp_path}/data:/mnt/data:16"], env=["MODE=x"], ports=["18085:8080"])
    assert done == [step]
    if STEPS.index(step) >= STEPS.index("start_machine"):
        (machine,) = [m for m in fake.machines.values() if m.spec.name == "web"]  # not the template's
        assert (machine.spec.incoming is not None) == (boot == "restored")
        if step == "personalize" and boot == "restored":
            assert machine.hotplugged and machine.guest.identity and machine.guest.identity["op"] == "configure"
        if step == "open_forwards":
            assert machine.forwards == [PortForward(18085, 8080)]
    if template is not None:
        assert template.path.exists()  # a failure of this VM is not the template's
    _nothing_left(layout, fake)
    store = VolumeStore(layout)
    vid = volume_id(tmp_path / "data")
    assert store.holder(vid) is None
    store.lock(vid, "test").release()  # the volume's lock is free again


def test_ctrl_c_while_booting_leaves_nothing(layout: Layout, fake: FakeBackend, image: Image,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(self: Launch, *args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Launch, "wait_for_agent", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _up(layout, fake, image)
    _nothing_left(layout, fake)


def test_a_guest_that_never_answers_is_a_boot_error(layout: Layout, fake: FakeBackend, image: Image) -> None:
    kept = layout.retained_logs / "web"
    kept.mkdir(parents=True)
    (kept / "console.log").write_text("an older VM named web: powering off\n")  # what `down` kept of it
    fake.agent_answers = False
    with pytest.raises(BootError, match="did not come up") as failed:
        mvm.up(image=image, name="web", layout=layout, backend=fake, boot_timeout=0.5)
    assert "`mvmctl logs web` shows all of it" in (failed.value.hint or "")
    # the failed boot's logs are what `logs web` shows now, not the older VM's (hands-on)
    assert "older VM" not in "".join(line.text for line in mvm.logs("web", layout=layout))
    assert (kept / "console.log").exists()
    _nothing_left(layout, fake)


def test_checks_before_the_build_and_the_preflight_create_nothing(layout: Layout, fake: FakeBackend,
                                                                  image: Image) -> None:
    fake.taken_ports = {18080}
    with pytest.raises(PortInUse):
        _up(layout, fake, image, ports=["18080:8080"])
    fake.fail_preflight = UsageError("KVM is not usable here")
    with pytest.raises(UsageError, match="KVM"):
        _up(layout, fake, image)
    with pytest.raises(UsageError, match="--cpus 0"):
        _up(layout, fake, image, cpus=0)
    over = (os.cpu_count() or 1) + 1
    with pytest.raises(UsageError, match=f"--cpus {over}: this host has {over - 1} CPU") as caught:
        _up(layout, fake, image, cpus=over)
    assert caught.value.hint == f"use --cpus {over - 1} or fewer"
    from mvm._api.options import host_memory_mib
    total = host_memory_mib()
    assert total is not None and total > 128
    if total < 65536:  # QEMU refused more than the host has, after the build and with no hint
        with pytest.raises(UsageError, match=f"--memory {total + 1}: this host has {total} MiB") as caught:
            _up(layout, fake, image, memory=total + 1)
        assert caught.value.hint == f"use --memory {total} or less"
    with pytest.raises(UsageError, match="unknown hypervisor"):
        _up(layout, fake, image, hypervisor="xen")
    _nothing_left(layout, fake)


def test_up_with_guest_ports_alone_records_the_picked_host_ports(layout: Layout, fake: FakeBackend,
                                                                 image: Image) -> None:
    vm = _up(layout, fake, image, ports=["8080", "9000:9000", "5353/udp"])
    ports = vm.info().ports
    assert [(p.guest_port, p.proto) for p in ports] == [(8080, "tcp"), (9000, "tcp"), (5353, "udp")]
    assert ports[0].host_port >= 40_000 and ports[1].host_port == 9000 and ports[2].host_port >= 40_000
    vm.down()


def test_restart_keeps_ports_env_volumes_and_options(layout: Layout, fake: FakeBackend, image: Image,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.builders.store import ImageStore

    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)
    asked: list[str] = []
    preflight = fake.preflight
    monkeypatch.setattr(fake, "preflight", lambda request: asked.append(request.accel) or preflight(request))
    (tmp_path / "data").mkdir()
    vm = _up(layout, fake, image, ports=["8080", "9000:9000"], env=["MODE=x"],
             volumes=[f"{tmp_path}/data:/mnt/data:16:secret"], hypervisor="qemu-tcg", log_limit_mb=8)
    before = vm.info()
    again = vm.restart()
    after = again.info()
    assert after.status is mvm.VMStatus.RUNNING and after.pid != before.pid
    assert [str(p) for p in after.ports] == [str(p) for p in before.ports]
    assert after.env_keys == ["MODE"] and after.volumes == before.volumes
    config = json.loads(again.files.config_disk.read_bytes().rstrip(b"\0"))
    assert config["env"] == {"MODE": "x"} and config["volumes"][0]["secret"]
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert machine.spec.log_limit == 8 << 20 and asked == ["tcg", "tcg"]  # --log-limit, --hypervisor kept
    again.down()


def test_wait_fails_fast_when_a_service_failed_for_good(layout: Layout, fake: FakeBackend, image: Image) -> None:
    fake.status["services"] = {"svc": {"state": "failed", "restarts": 0, "last_exit": 1,
                                       "reason": "preStart exited with 1"}}
    fake.status["health"] = {"check": {"state": "starting", "failures": 0}}
    started = time.monotonic()
    with pytest.raises(ServiceFailed, match="service svc failed: preStart exited with 1") as exc:
        _up(layout, fake, image, wait=True, wait_timeout=60)
    assert time.monotonic() - started < 10 and "left running" in (exc.value.hint or "")
    (row,) = mvm.ls(layout=layout)
    assert row.failing == ["svc"] and row.health == "starting"
    fake.status["services"] = {"svc": {"state": "backoff", "restarts": 7, "last_exit": 2}}
    with pytest.raises(ServiceFailed, match=r"keeps failing: crash-looping \(7 restarts, last exit 2\)"):
        mvm.get("web", layout=layout).wait_healthy(60)
    # a one-shot under the default restart policy: exit 0 again and again, and what to do about it
    fake.status["services"] = {"svc": {"state": "backoff", "restarts": 5, "last_exit": 0, "restart": "always"}}
    with pytest.raises(ServiceFailed, match='exits 0 and is started again .*restart = "on-failure"'):
        mvm.get("web", layout=layout).wait_healthy(60)
    # a program the shell could not find: failing from its first run, not its fifth
    fake.status["services"] = {"svc": {"state": "backoff", "restarts": 0, "last_exit": 127,
                                       "reason": "command not found (exit 127): add the program's package"}}
    with pytest.raises(ServiceFailed, match="service svc keeps failing: command not found"):
        mvm.get("web", layout=layout).wait_healthy(60)
    fake.status["services"] = {"svc": {"state": "backoff", "restarts": 0, "last_exit": 127}}  # a long run's 127
    assert mvm.get("web", layout=layout).guest_status().failing() is None
    mvm.down("web", layout=layout)


def test_wait_is_not_fooled_by_a_guest_that_reports_nothing_yet(layout: Layout, fake: FakeBackend,
                                                                 image: Image) -> None:
    """A clone restored from an ``agent`` template reports no services and no checks until
    its config is applied: that is not healthy."""
    vm = _up(layout, fake, image)
    healthy = dict(fake.status)
    fake.status.update(services={}, health={})
    with pytest.raises(HealthTimeout, match="has not reported check, svc yet"):
        vm.wait_healthy(0.3)
    fake.status.update(healthy)
    assert vm.wait_healthy(5).health == "healthy"
    # a check named after its service: a timeout shows that service's output, not the boot console
    with open(vm.files.events_log, "a") as f:
        f.write(json.dumps({"t": time.time(), "kind": "log", "svc": "svc", "stream": "stderr",
                            "line": "bind: address in use"}) + "\n")
    fake.status.update(health={"svc": {"state": "unhealthy", "last_exit": 7, "failures": 3}})
    with pytest.raises(HealthTimeout, match="svc is unhealthy") as caught:
        vm.wait_healthy(0.3)
    assert "svc | bind: address in use" in (caught.value.output or "")
    fake.status.update(healthy)
    # every check healthy, but a service not started yet (its preStart still runs): not ready
    fake.status.update(services={"svc": {"state": "prestart"}})
    with pytest.raises(HealthTimeout, match="not healthy after 0.3s: service svc is prestart"):
        vm.wait_healthy(0.3)
    fake.status.update(services={"svc": {"state": "exited", "last_exit": 0}})  # a one-shot that finished
    assert vm.wait_healthy(5).health == "healthy"
    fake.status.update(healthy)
    vm.down()


def test_wait_without_health_checks_waits_for_the_services(layout: Layout, fake: FakeBackend,
                                                           image: Image) -> None:
    """`up --wait` of a guest with services and no checks returned at once, and said the VM
    was up while its one service crash-looped on a program that was not there."""
    image.manifest.guest = image.manifest.guest.model_copy(update={"health_checks": {}})
    fake.status.update(health={}, services={"svc": {"state": "backoff", "restarts": 0, "last_exit": 127,
                                                    "reason": "command not found (exit 127)"}})
    with pytest.raises(ServiceFailed, match="service svc keeps failing: command not found"):
        _up(layout, fake, image, wait=True, wait_timeout=60)
    mvm.down("web", layout=layout)
    fake.status.update(services={"svc": {"state": "pending"}})
    with pytest.raises(HealthTimeout, match="service svc is pending"):
        _up(layout, fake, image, wait=True, wait_timeout=0.5)
    mvm.down("web", layout=layout)
    # "running" the moment its `sh -c` started, before the shell finds its program missing:
    # not started until it has run START_SECS (the 127 is then caught as above)
    fake.status.update(services={"svc": {"state": "running", "pid": 7, "uptime": 0.2}})
    with pytest.raises(HealthTimeout, match="service svc is running"):
        _up(layout, fake, image, wait=True, wait_timeout=0.5)
    mvm.down("web", layout=layout)
    fake.status.update(services={"svc": {"state": "running", "pid": 7, "uptime": 1.5}})
    assert _up(layout, fake, image, wait=True, wait_timeout=60).guest_status().services[0].state == "running"
    mvm.down("web", layout=layout)


def test_two_ups_of_one_name(layout: Layout, fake: FakeBackend, image: Image, tmp_path: Path) -> None:
    vm = _up(layout, fake, image)
    with pytest.raises(VMExists, match=r"already exists \(running\)") as exc:
        _up(layout, fake, image)
    assert "mvmctl down web" in (exc.value.hint or "")
    assert len([m for m in fake.machines.values() if m.running]) == 1
    # its ports are the running VM's too: the name is said first, not "port not available"
    fake.taken_ports = {18000}
    with pytest.raises(VMExists, match=r"already exists \(running\)"):
        _up(layout, fake, image, name="web", ports=["18000:8080"])
    # ... also when the name is the spec's, known before the build only from its mvm.toml
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "mvm.toml").write_text('name = "web"\n')
    with pytest.raises(VMExists, match=r"already exists \(running\)"):
        mvm.up(spec, ports=["18000:8080"], layout=layout, backend=fake)
    (spec / "mvm.toml").write_text('name = "other"\n')
    with pytest.raises(mvm.PortInUse):  # another name: the port is the cause
        mvm.up(spec, ports=["18000:8080"], layout=layout, backend=fake)
    vm.down()


def test_a_vm_in_a_with_block_is_down_when_it_ends(layout: Layout, fake: FakeBackend, image: Image) -> None:
    with pytest.raises(RuntimeError), _up(layout, fake, image) as vm:
        assert vm.status is mvm.VMStatus.RUNNING
        raise RuntimeError("the block fails")
    _nothing_left(layout, fake)
    with _up(layout, fake, image) as vm:
        vm.down()  # brought down in the block: the end of the block finds it gone, and says nothing
    _nothing_left(layout, fake)


def test_down_of_a_machine_that_will_not_die_keeps_the_vm(layout: Layout, fake: FakeBackend, image: Image) -> None:
    vm = _up(layout, fake, image)
    fake.unkillable = True
    with pytest.raises(StopFailed):
        mvm.down("web", layout=layout, timeout=0.2)
    (row,) = mvm.ls(layout=layout)
    assert row.name == "web" and row.status is mvm.VMStatus.STOPPING  # still listed: down can be retried
    fake.unkillable = False
    assert mvm.down("web", layout=layout).how == "shut down cleanly"
    _nothing_left(layout, fake)
    del vm


def test_down_works_on_a_full_disk(layout: Layout, fake: FakeBackend, image: Image,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest filled the host's disk (a sparse volume, say): down still stops it and removes
    it; only the logs it could not keep are lost, and it says so."""
    import errno

    from mvm.runtime import logs, registry

    _up(layout, fake, image)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry, "write_json_atomic", full)
    monkeypatch.setattr(logs, "retain", full)
    assert mvm.down("web", layout=layout).how == "shut down cleanly; its logs were not kept (the disk is full)"
    _nothing_left(layout, fake)


def test_down_waits_for_the_up_that_is_starting_the_vm(layout: Layout, fake: FakeBackend, image: Image) -> None:
    """Refused while `up` had not started the machine, accepted once it had: that `up` then
    failed with "no VM named 'web'" (hands-on)."""
    from mvm import _pids
    from mvm.runtime.registry import ProcessRecord

    vm = _up(layout, fake, image)

    def starting(r: Any) -> None:  # its machine runs; its `up` (this process) is still at work
        r.phase, r.owner = "starting", ProcessRecord(pid=os.getpid(), start_time=_pids.start_time(os.getpid()))

    Registry(layout).update("web", starting)
    with pytest.raises(mvm.VMError, match=f"VM 'web' is being started by process {os.getpid()}"):
        mvm.down("web", layout=layout)
    Registry(layout).update("web", lambda r: setattr(r, "phase", "running"))
    vm.down()


def test_logs_follow_says_how_the_vm_ended(layout: Layout, fake: FakeBackend, image: Image) -> None:
    """`logs -f` of a VM whose QEMU was killed ended with exit 0 and no word (hands-on)."""
    vm = _up(layout, fake, image)
    (machine,) = fake.machines.values()
    threading.Timer(0.3, fake.crash, args=(machine.ref,)).start()
    last = list(vm.logs(follow=True))[-1]
    assert last.source == "init" and last.text.startswith("[mvm] web is crashed"), last
    assert not any(line.text.startswith("[mvm]") for line in vm.logs())  # without follow: nothing added
    vm.down()


def test_status_follows_the_machine(layout: Layout, fake: FakeBackend, image: Image) -> None:
    vm = _up(layout, fake, image)
    (machine,) = fake.machines.values()
    fake.crash(machine.ref)
    info = vm.info()
    assert info.status is mvm.VMStatus.CRASHED and info.pid is None and info.exit_reason
    assert mvm.down("web", layout=layout).how == "not running"

    vm = _up(layout, fake, image)
    vm.exec(["true"])
    (machine,) = [m for m in fake.machines.values() if m.running]
    fake._power_off(machine.ref.pid)  # the guest powers itself off
    assert vm.status is mvm.VMStatus.EXITED and vm.info().exit_reason == "powered off"
    vm.down()

    vm = _up(layout, fake, image)  # its kernel powers off, init bypassed (sysrq o, poweroff -f)
    (machine,) = [m for m in fake.machines.values() if m.running]
    with open(vm.files.console_log, "ab") as console:
        console.write(b"[   42.1] reboot: Power down\n")
    fake.crash(machine.ref)
    assert vm.status is mvm.VMStatus.EXITED
    assert vm.info().exit_reason == "powered off by its kernel (the services were not stopped first)"
    vm.down()


def test_backend_for_uses_the_recorded_backend_and_passes_the_runner_on(layout: Layout, image: Image) -> None:
    given: list[Runner] = []
    backend = FakeBackend()

    def factory(runner: Runner) -> FakeBackend:
        given.append(runner)
        return backend

    backends.register("fake", factory)
    marker: Runner = DEFAULT_RUNNER.__class__()
    try:
        vm = mvm.up(image=image, layout=layout, backend=backend, runner=marker, boot_timeout=5)
        vm.forward("19191:80")
        vm.down()
    finally:
        backends.unregister("fake")
    assert given and all(r is marker for r in given)


def test_unreadable_and_old_state_is_reported_not_crashed_on(layout: Layout, fake: FakeBackend) -> None:
    registry = Registry(layout)
    for name, text in (("junk", "{not json"), ("old", json.dumps({"schema_version": 1, "name": "old"}))):
        (layout.vms / name).mkdir(parents=True)
        (layout.vms / name / "vm.json").write_text(text)
    rows = {row.name: row for row in mvm.ls(layout=layout)}
    assert rows["junk"].status is mvm.VMStatus.BROKEN and "unreadable" in (rows["junk"].error or "")
    assert "schema_version 1" in (rows["old"].error or "")
    with pytest.raises(StateError) as exc:
        registry.load("old")
    assert "mvmctl down old" in (exc.value.hint or "")
    assert mvm.down("junk", layout=layout).how == "not running"
    assert mvm.cleanup(layout).items[0].reason == "VM old is broken"
    assert mvm.ls(layout=layout) == []


def test_vm_json_is_private_and_written_atomically(layout: Layout, fake: FakeBackend, image: Image) -> None:
    vm = _up(layout, fake, image)
    mode = os.stat(vm.files.state).st_mode & 0o777
    assert mode == 0o600 and os.stat(vm.files.root).st_mode & 0o777 == 0o700
    assert not [p for p in vm.files.root.iterdir() if p.name.startswith(".vm.json")]
    assert json.loads(vm.files.state.read_text())["schema_version"] == 2
    vm.down()


def test_logs_outlive_down_until_cleanup_or_the_next_up(layout: Layout, fake: FakeBackend, image: Image) -> None:
    vm = _up(layout, fake, image)
    now = time.time()
    with open(vm.files.events_log, "a") as f:
        f.write(json.dumps({"kind": "log", "svc": "svc", "stream": "stdout", "line": "old", "t": now - 600}) + "\n")
        f.write(json.dumps({"kind": "log", "svc": "svc", "stream": "stdout", "line": "new", "t": now}) + "\n")
        f.write(json.dumps({"kind": "log", "svc": "other", "stream": "stdout", "line": "x", "t": now}) + "\n")
    assert [ln.text.split("| ")[1] for ln in vm.logs(service="svc")] == ["old", "new"]
    with pytest.raises(UsageError, match="no service 'nope'"):
        vm.logs(service="nope")
    vm.down()
    texts = [ln.text for ln in mvm.logs("web", layout=layout, since=now - 60)]
    assert len(texts) == 2 and texts[0].endswith("svc | new") and texts[1].endswith("other | x")
    with pytest.raises(UsageError, match="the kept logs of web have no service 'nope'") as caught:
        mvm.logs("web", layout=layout, service="nope")
    assert caught.value.hint == "its services: other, svc"
    assert (layout.retained_logs / "web" / "events.log").is_file()
    _up(layout, fake, image).down()  # a new up of the name replaces them; its down keeps its own
    assert not [ln for ln in mvm.logs("web", layout=layout) if "old" in ln.text]
    report = mvm.cleanup(layout)
    assert [i.kind for i in report.items] == ["logs"]  # down took the VM's lock file
    with pytest.raises(VMNotFound, match="no logs"):
        mvm.logs("web", layout=layout)


def test_down_without_keeping_logs_leaves_nothing(layout: Layout, fake: FakeBackend, image: Image) -> None:
    _up(layout, fake, image).down(keep_logs=False)
    assert not (layout.retained_logs / "web").exists() and not (layout.vms / "web").exists()
    with pytest.raises(VMNotFound, match="no logs"):
        mvm.logs("web", layout=layout)


def test_retained_logs_are_capped_oldest_first(tmp_path: Path) -> None:
    from mvm.runtime import logs

    root = tmp_path / "logs"
    for i, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        (root / name / "events.log").write_bytes(b"x" * 1000)
        os.utime(root / name, (1000 + i, 1000 + i))
    logs.prune(root, cap=2500)
    assert sorted(p.name for p in root.iterdir()) == ["b", "c"]


def test_parse_since() -> None:
    from mvm._api.options import parse_since

    assert parse_since("90s", now=1000.0) == 910.0 and parse_since("2h", now=10_000.0) == 2800.0
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("2026-11-30T14:05:00+00:00") == 1796047500.0
    with pytest.raises(UsageError, match="not a duration or a time"):
        parse_since("yesterday")


# --- fast start: templates, restores, and the fall back to a cold boot -------------------


@pytest.fixture()
def template(layout: Layout, fake: FakeBackend, image: Image) -> Template:
    return make_template(image, cpus=1, memory=512, layout=layout, backend=fake)


def test_a_template_is_made_from_one_boot_and_kept_whole(template: Template, fake: FakeBackend,
                                                         layout: Layout) -> None:
    assert template.meta.kinds == ["agent", "ready"]
    for kind in ("agent", "ready"):
        assert template.state(kind).is_file() and template.ram(kind).is_file() and template.root(kind).is_file()
    assert not [m for m in fake.machines.values() if m.running], "the template's machine was left running"
    assert not [p for p in layout.templates.iterdir() if p.name.startswith(".build-")]


def test_up_restores_a_ready_template_and_makes_each_clone_unique(template: Template, layout: Layout,
                                                                   fake: FakeBackend, image: Image) -> None:
    a = _up(layout, fake, image, name="a")
    b = _up(layout, fake, image, name="b")
    info = a.info()
    assert info.start == "restored" and "(ready)" in (info.start_reason or "")
    clones = [m for m in fake.machines.values() if m.running]
    assert [m.spec.incoming.state for m in clones] == [template.state("ready")] * 2  # type: ignore[union-attr]
    assert all(m.spec.memory_file and not m.spec.memory_file.shared for m in clones)  # copy-on-write RAM
    seeds = [m.guest.identity["seed"] for m in clones]  # type: ignore[index]
    assert len(set(seeds)) == 2 and [m.guest.identity["op"] for m in clones] == ["refresh"] * 2  # type: ignore[index]
    assert [m.guest.identity["hostname"] for m in clones] == ["a", "b"]  # type: ignore[index]
    assert (a.files.root / "root.qcow2").is_file()
    assert all(m.spec.config_disk is None for m in clones)  # the config comes through `refresh`
    assert not any(m.spec.starts_services for m in clones)  # their services run already
    # the template's boot, copied into the clone's logs, is marked as such where it ends
    shown = [line.text for line in a.logs(console=False)]
    assert any(f"[init] a restored from template {template.meta.key[:12]} (ready state): the lines above are "
               "the template's boot" in text for text in shown), shown
    a.down()
    b.down()


def test_a_clone_opens_its_forwards_only_once_it_is_its_own_machine(template: Template, layout: Layout,
                                                                      fake: FakeBackend, image: Image,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Until its `refresh`, a clone has the template's kernel RNG state: no one may reach its
    services before it."""
    import json

    real = fake.forward
    refreshed_first: list[bool] = []

    def forward(files: VMFiles, machine: MachineRef, fwd: PortForward) -> PortForward:
        refreshed_first.append(fake.machines[machine.pid].guest.identity is not None)
        return real(files, machine, fwd)

    monkeypatch.setattr(fake, "forward", forward)
    vm = _up(layout, fake, image, ports=["8080", "9000:9000"])
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert refreshed_first == [True, True] and machine.spec.ports == []  # nothing forwarded at start
    ports = vm.info().ports
    assert [p.guest_port for p in ports] == [8080, 9000] and ports[1].host_port == 9000 and ports[0].host_port
    launch = json.loads(vm.files.launch.read_text())  # `resume` opens the same host ports
    assert [p["host_port"] for p in launch["spec"]["ports"]] == [p.host_port for p in ports]
    vm.down()


def test_a_boot_opens_its_forwards_once_its_guest_answers(layout: Layout, fake: FakeBackend, image: Image,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Before its init configures the network, a forwarded connection would lose its SYN
    and wait in slirp for a resend: the forwards open after the agent's answer instead."""
    real = fake.forward
    answered: list[bool] = []

    def forward(files: VMFiles, machine: MachineRef, fwd: PortForward) -> PortForward:
        answered.append(any(r.get("op") == "ping" for r in fake.machines[machine.pid].guest.requests))
        return real(files, machine, fwd)

    monkeypatch.setattr(fake, "forward", forward)
    vm = _up(layout, fake, image, ports=["8080", "9000:9000"])
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert answered == [True, True] and machine.spec.ports == []  # nothing forwarded at start
    assert [p.guest_port for p in vm.info().ports] == [8080, 9000] and vm.info().ports[0].host_port
    vm.down()


def test_env_or_volumes_restore_the_agent_template_and_configure_it(template: Template, layout: Layout,
                                                                    fake: FakeBackend, image: Image,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.builders.store import ImageStore

    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)
    (tmp_path / "data").mkdir()
    vm = _up(layout, fake, image, env=["MODE=x"], volumes=[f"{tmp_path}/data:/mnt/data:16"])
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert "(agent)" in (vm.info().start_reason or "") and machine.guest.identity is not None
    assert machine.guest.identity["op"] == "configure" and machine.spec.starts_services
    config = machine.guest.identity["config"]
    assert config["env"] == {"MODE": "x"} and config["volumes"][0]["target"] == "/mnt/data"
    assert [slot for slot, _ in machine.hotplugged] == [0]
    again = vm.restart()  # the restarted VM keeps its -e values (read back from the VM's config disk)
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert machine.guest.identity is not None and machine.guest.identity["config"]["env"] == {"MODE": "x"}
    again.down()


def test_cold_and_damaged_templates_boot_cold_and_say_why(template: Template, layout: Layout,
                                                          fake: FakeBackend, image: Image,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.builders.store import ImageStore

    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)
    vm = _up(layout, fake, image, cold=True)
    assert (vm.info().start, vm.info().start_reason) == ("cold", "--cold")
    vm = vm.restart()  # keeps --cold (it restored from the template)
    assert (vm.info().start, vm.info().start_reason) == ("cold", "--cold")
    vm.down()
    vm = _up(layout, fake, image).restart()
    assert vm.info().start == "restored"
    vm.down()
    with open(template.ram("ready"), "r+b") as ram:  # bytes flipped in the middle of the saved RAM
        ram.seek(256 * 1024 * 1024)
        ram.write(b"\xff\xff")
    vm = _up(layout, fake, image)
    info = vm.info()
    assert info.start == "cold" and "damaged" in (info.start_reason or "") and "changed" in (info.start_reason or "")
    assert not template.path.exists()  # removed, to be made again
    vm.down()


def test_a_failed_restore_falls_back_to_a_cold_boot_and_leaves_nothing(template: Template, layout: Layout,
                                                                       fake: FakeBackend, image: Image) -> None:
    template.state("ready").write_text("not a saved machine")  # readable, but QEMU would refuse it
    meta = template.meta.model_copy(deep=True)  # re-recorded: the store's change check passes, QEMU's fails
    meta.files["ready.state"] = [template.state("ready").stat().st_size, template.state("ready").stat().st_mtime_ns,
                                 template.state("ready").stat().st_ctime_ns]
    (template.path / "template.json").write_text(meta.model_dump_json())
    vm = _up(layout, fake, image)
    info = vm.info()
    assert info.start == "cold" and "restoring failed" in (info.start_reason or "")
    assert len([m for m in fake.machines.values() if m.running]) == 1
    assert not template.path.exists()
    vm.down()
    _nothing_left(layout, fake)


def test_a_machine_qemu_paused_is_said_and_resume_continues_it(layout: Layout, fake: FakeBackend,
                                                               image: Image) -> None:
    """A full host disk under a VM's disk: QEMU paused the machine, `status` said only that the
    agent did not answer (pointing at `status`), and only `down` got out of it (hands-on)."""
    vm = _up(layout, fake, image)
    machine = vm.record().machine
    assert machine is not None
    fake.pause(machine.ref, "io-error")
    with pytest.raises(mvm.VMError, match="VM 'web' is paused: a write to one of its disks failed") as paused:
        vm.guest_status(timeout=0.3)
    assert paused.value.hint is not None and paused.value.hint.endswith("then `mvmctl resume web` continues it")
    info = vm.resume(ask_guest=False)  # space freed: it runs on, the same machine
    assert info.status is mvm.VMStatus.RUNNING and info.pid == machine.pid
    assert vm.guest_status(timeout=2.0).services
    with pytest.raises(mvm.VMError, match="is not suspended"):
        vm.resume()  # running, not paused: nothing to continue
    vm.files.saved_state.write_bytes(b"state")  # a suspend killed after it saved: paused, its state left
    fake.pause(machine.ref, "postmigrate")
    vm.resume(ask_guest=False)
    assert not vm.files.saved_state.exists()
    fake.pause(machine.ref, "guest-panicked")  # no `cont` ends that
    with pytest.raises(mvm.AgentError, match="VM 'web' does not run: QEMU says 'guest-panicked'") as panicked:
        vm.resume()
    assert panicked.value.hint == "`mvmctl restart web` boots it again (`mvmctl logs web` may say why)"
    assert vm.info().health == "unknown"  # info() of such a VM still answers
    vm.down()


def test_a_log_limit_of_0_says_what_the_limit_is(layout: Layout, fake: FakeBackend, image: Image) -> None:
    with pytest.raises(UsageError, match="--log-limit 0: must be at least 1 MiB") as bad:
        _up(layout, fake, image, log_limit_mb=0)
    assert "logs cannot be turned off" in (bad.value.hint or "")
    _nothing_left(layout, fake)


def test_a_damaged_saved_machine_says_how_to_discard_it(layout: Layout, fake: FakeBackend, image: Image) -> None:
    """A truncated saved state: `resume` said "QMP query-migrate failed: Disconnected", no hint."""
    from mvm.errors import RestoreFailed

    vm = _up(layout, fake, image)
    vm.suspend()
    fake.fail_start = RestoreFailed("web", "QEMU could not restore the saved machine (QEMU exited)",
                                    output="error while loading state section id 2(ram)")
    with pytest.raises(RestoreFailed) as failed:
        vm.resume()
    assert failed.value.hint == ("the saved machine may be damaged (QEMU's words above): `mvmctl down web` "
                                 "discards it; its volumes are kept")
    assert vm.info(ask_guest=False).status is mvm.VMStatus.SUSPENDED  # nothing lost meanwhile
    fake.fail_start = None
    vm.down()


def test_suspend_and_resume(layout: Layout, fake: FakeBackend, image: Image, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    vm = _up(layout, fake, image, volumes=[f"{tmp_path}/data:/mnt/data:16"])
    first = vm.info().pid
    assert vm.suspend().status is mvm.VMStatus.SUSPENDED
    assert vm.files.saved_state.is_file() and not [m for m in fake.machines.values() if m.running]
    (row,) = mvm.ls(layout=layout)
    assert row.status is mvm.VMStatus.SUSPENDED and row.pid is None
    assert mvm.cleanup(layout).items == []  # a suspended VM is kept
    with pytest.raises(mvm.VMNotRunning, match="is suspended") as not_running:
        vm.exec(["true"])
    assert not_running.value.hint == "bring it back with `mvmctl resume web`"
    info = vm.resume()
    assert info.status is mvm.VMStatus.RUNNING and info.pid != first and not vm.files.saved_state.exists()
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert machine.spec.incoming is not None and machine.spec.hold_fds  # restored, holding the volume lock
    assert not machine.spec.starts_services  # they were running when it was saved
    vm.forward(PortForward(18123, 9090))  # added after its `up`: resumed with it
    vm.suspend()
    quiet = vm.resume(ask_guest=False)  # `mvmctl resume` without --json: no status round trip
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert quiet.status is mvm.VMStatus.RUNNING and quiet.health == "unknown"
    assert "status" not in [m["op"] for m in machine.guest.requests]
    assert PortForward(18123, 9090) in machine.spec.ports
    vm.suspend()
    # its image removed meanwhile (rmi in another MVM_HOME sharing the cache): an error, not a traceback
    (image.path / "rootfs.ext4").rename(image.path / "gone")
    with pytest.raises(StateError, match="cannot be resumed: its image is gone"):
        vm.resume()
    (image.path / "gone").rename(image.path / "rootfs.ext4")
    assert vm.info(ask_guest=False).status is mvm.VMStatus.SUSPENDED  # still there to resume
    assert mvm.down("web", layout=layout).how == "not running; its saved state discarded"  # down of a suspended VM
    _nothing_left(layout, fake)


def test_uptime_goes_on_across_suspend_and_starts_again_at_restart(layout: Layout, fake: FakeBackend, image: Image,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As the guest's own uptime and its services' do: time suspended is not counted, and a
    resumed VM is not 'up 1s' (`ls` said so)."""
    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)
    vm = _up(layout, fake, image)

    def ran_100s(r: Any) -> None:
        r.started_at = time.time() - 100

    Registry(layout).update("web", ran_100s)
    vm.suspend()
    uptime = vm.resume(ask_guest=False).uptime
    assert uptime is not None and 100 <= uptime < 110
    vm.suspend()
    uptime = vm.resume(ask_guest=False).uptime
    assert uptime is not None and 100 <= uptime < 110  # counted once, not twice
    vm.suspend()
    vm.resume(ask_guest=False)
    assert (vm.restart().info().uptime or 0) < 10  # a new boot
    vm.down()


def test_a_restart_that_cannot_start_again_keeps_the_vm_or_says_how_to_start_it(
        layout: Layout, fake: FakeBackend, image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """restart is down + up: an up that failed (a read-only volume's directory moved away, its
    host port taken meanwhile) left no VM and no record of how it had been started (hands-on)."""
    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)
    (tmp_path / "cfg").mkdir()
    vm = _up(layout, fake, image, ports=["18124:8080"], env=["TOKEN=s3cret"], volumes=[f"{tmp_path}/cfg:/mnt/cfg"])
    (tmp_path / "cfg").rename(tmp_path / "moved")
    with pytest.raises(mvm.VolumeError, match="HOSTDIR .* does not exist"):
        vm.restart()
    assert vm.info().status is mvm.VMStatus.RUNNING  # checked before its down
    (tmp_path / "moved").rename(tmp_path / "cfg")
    fake.taken_ports.add(18124)  # taken in the gap between down and up
    with pytest.raises(mvm.PortInUse) as taken:
        vm.restart()
    assert "web was stopped and is gone: once that is fixed, start it again with `mvmctl up " in str(taken.value.hint)
    assert f"-p 18124:8080/tcp -v {tmp_path}/cfg:/mnt/cfg -e TOKEN=...` (its -e values as before)" in str(
        taken.value.hint)
    assert "s3cret" not in str(taken.value.hint)
    _nothing_left(layout, fake)


def test_a_resume_killed_midway_leaves_no_second_machine(layout: Layout, fake: FakeBackend, image: Image,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`resume` SIGKILLed after it started the machine and before it recorded it: the next
    `resume` started a second machine on the same root disk (hands-on); with a volume, it was
    refused with a hint to resume."""
    from mvm._api import suspend
    from mvm.backends.base import Incoming

    (tmp_path / "data").mkdir()
    vm = _up(layout, fake, image, volumes=[f"{tmp_path}/data:/mnt/data:16"])
    vm.suspend()
    spec = suspend._read_launch("web", vm.files)
    spec.incoming, spec.ports = Incoming(vm.files.saved_state, ignore_shared=False), []
    left = fake.start(spec)  # what the killed resume had started: its guest runs on
    info = vm.resume(ask_guest=False)
    assert info.pid == left.pid and [m.ref for m in fake.machines.values() if m.running] == [left]
    assert not vm.files.saved_state.exists()
    vm.suspend()
    monkeypatch.setattr(suspend, "STRAY_ANSWER_SECS", 0.3)
    fake.agent_answers = False
    cut_short = fake.start(spec)  # its restore never finished: no guest answers
    fake.agent_answers = True
    info = vm.resume(ask_guest=False)
    assert info.pid != cut_short.pid and not fake.alive(cut_short)
    assert len([m for m in fake.machines.values() if m.running]) == 1
    vm.down()
    _nothing_left(layout, fake)


def test_a_suspended_vm_keeps_its_volumes(layout: Layout, fake: FakeBackend, image: Image, tmp_path: Path) -> None:
    """A suspended guest has the volume's file system mounted, its writes partly in memory: a
    second VM on the volume meanwhile had its changes overwritten by the resumed one (data
    lost), and `volume rm` let `resume` fail on a missing disk with a traceback."""
    (tmp_path / "data").mkdir()
    volume = f"{tmp_path}/data:/mnt/data:16"
    vm = _up(layout, fake, image, volumes=[volume])
    vm.suspend()
    with pytest.raises(mvm.VolumeError, match="belongs to suspended VM 'web'") as refused:
        _up(layout, fake, image, name="other", volumes=[volume])
    assert refused.value.hint is not None and "mvmctl resume web" in refused.value.hint
    with pytest.raises(mvm.VolumeError, match="suspended VM 'web'"):
        mvm.volume_rm(str(tmp_path / "data"), layout=layout)
    with pytest.raises(mvm.VolumeError, match="suspended VM 'web'"):
        mvm.volume_export(str(tmp_path / "data"), layout=layout)
    (row,) = mvm.volume_ls(layout=layout)
    assert row.held_by == "suspended VM 'web'"
    with pytest.raises(mvm.VMError, match="is suspended: restarting it would discard its saved state") as refused:
        vm.restart()  # was down + up, the saved machine lost unasked
    # the way to start it afresh names it, and its volume (the hint had only the spec: a VM named after it)
    assert refused.value.hint is not None and f"--name web --cpus 1 --memory 512 -v {tmp_path}/data:/mnt/data:16" in (
        refused.value.hint)
    assert vm.files.saved_state.is_file()
    vm.resume()  # its own resume takes them back
    vm.down()
    _up(layout, fake, image, name="other", volumes=[volume]).down()  # free once the VM is gone


def test_a_resume_that_fails_leaves_the_volumes_to_the_suspended_vm(
        layout: Layout, fake: FakeBackend, image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm._api import suspend as suspend_module

    (tmp_path / "data").mkdir()
    volume = f"{tmp_path}/data:/mnt/data:16"
    vm = _up(layout, fake, image, volumes=[volume])
    vm.suspend()

    def silent(*_args: object, **_kwargs: object) -> None:
        raise mvm.AgentTimeout("web", "the guest agent did not answer")

    monkeypatch.setattr(suspend_module.agent, "wait_ready", silent)
    with pytest.raises(mvm.AgentTimeout):
        vm.resume()
    assert not [m for m in fake.machines.values() if m.running]  # the machine it started is stopped
    assert vm.info().status is mvm.VMStatus.SUSPENDED
    with pytest.raises(mvm.VolumeError, match="belongs to suspended VM 'web'"):
        _up(layout, fake, image, name="other", volumes=[volume])
    monkeypatch.undo()
    vm.resume()
    vm.down()


def test_resume_of_a_vm_whose_volume_was_removed_is_a_clear_error(layout: Layout, fake: FakeBackend, image: Image,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    vm = _up(layout, fake, image, volumes=[f"{tmp_path}/data:/mnt/data:16"])
    vm.suspend()
    (disk,) = layout.volumes.glob("data-*/disk.ext4")
    disk.unlink()  # by hand: `volume rm` refuses
    with pytest.raises(mvm.StateError, match="its volume .*data is gone") as gone:
        vm.resume()
    assert gone.value.hint is not None and "mvmctl down web" in gone.value.hint
    assert not [m for m in fake.machines.values() if m.running]
    mvm.down("web", layout=layout)
    _nothing_left(layout, fake)


def test_rmi_keeps_what_a_suspended_vm_resumes_from_and_refuses_an_ambiguous_prefix(
        layout: Layout, fake: FakeBackend, image: Image) -> None:
    from mvm.builders.store import ImageStore, Manifest

    store = ImageStore(layout.images)

    def publish(key: str) -> None:
        def make(staging: Path) -> Manifest:
            (staging / "rootfs.ext4").write_bytes(b"x")
            return image.manifest.model_copy(update={"key": key})
        store.publish(key, make)

    for key in (image.key, "abcd1" + "0" * 27, "abcd2" + "0" * 27):
        publish(key)
    vm = _up(layout, fake, image)
    vm.suspend()
    with pytest.raises(UsageError, match="used by running or suspended VM.*: web"):
        mvm.rmi(image.key[:12], layout=layout)
    assert store.get(image.key) is not None  # `resume web` still has its root disk's backing
    with pytest.raises(UsageError, match="'abcd' is the start of 2 image keys") as ambiguous:
        mvm.rmi("abcd", layout=layout)
    assert ambiguous.value.hint and "more of the key" in ambiguous.value.hint
    assert [i.key for i in mvm.rmi("abcd1", layout=layout)] == ["abcd1" + "0" * 27]
    assert store.get("abcd2" + "0" * 27) is not None
    mvm.down("web", layout=layout)
    assert [i.key for i in mvm.rmi(image.key, layout=layout)] == [image.key]


def test_an_unknown_templates_mode_is_refused_before_anything_starts(layout: Layout, fake: FakeBackend, image: Image,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_TEMPLATES", "restroe")
    with pytest.raises(UsageError, match="MVM_TEMPLATES='restroe'") as caught:
        _up(layout, fake, image)
    assert "auto (the default), restore or off" in (caught.value.hint or "")
    _nothing_left(layout, fake)
    monkeypatch.setenv("MVM_TEMPLATES", "")  # empty is unset: auto
    assert templates_mode() == "auto"


def test_up_says_when_it_leaves_a_template_maker_running(layout: Layout, fake: FakeBackend, image: Image,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The maker boots a VM that `ls` does not list: `up` must say so, and only when it starts one."""
    from mvm._api import template_maker

    started: list[int] = []
    monkeypatch.setattr(template_maker, "make_in_background", lambda image, **kw: started.append(kw["memory"]))
    monkeypatch.setenv("MVM_TEMPLATES", "auto")

    class Notes:
        def __init__(self) -> None:
            self.notes: list[str] = []

        def stage(self, name: str) -> None: ...
        def line(self, text: str) -> None: ...
        def note(self, text: str) -> None:
            self.notes.append(text)

    cold = Notes()
    _up(layout, fake, image, name="a", cold=True, progress=cold).down()  # --cold: no template is made
    assert cold.notes == [] and started == []
    first = Notes()
    _up(layout, fake, image, name="b", progress=first).down()
    assert started == [512]
    assert first.notes == ["making the image's template in the background (a VM of 512 MiB for a few seconds, "
                           "not listed by `mvmctl ls`); the next `up` of this image and shape restores it "
                           "(`mvmctl template ls`)"]
    # an `up --wait` that fails (or is interrupted) starts none: it would outlive the undone `up`
    fake.status["services"] = {"svc": {"state": "failed", "restarts": 0, "last_exit": 1, "reason": "exited 1"}}
    with pytest.raises(ServiceFailed):
        _up(layout, fake, image, name="c", progress=Notes(), wait=True)
    mvm.down("c", layout=layout)
    assert started == [512]


def test_restart_refuses_a_shape_the_host_cannot_run_before_it_stops_the_vm(layout: Layout, fake: FakeBackend,
                                                                              image: Image,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.builders.store import ImageStore

    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    vm = _up(layout, fake, image, cpus=4)  # made on a bigger host, say
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(UsageError, match="web has 4 vCPUs: this host has 2 CPUs") as caught:
        vm.restart()
    assert "mvmctl down web" in (caught.value.hint or "")
    assert vm.info().status is mvm.VMStatus.RUNNING  # not stopped for nothing
    vm.down()


def test_a_damaged_launch_record_is_a_clear_error_and_down_still_works(layout: Layout, fake: FakeBackend,
                                                                       image: Image) -> None:
    vm = _up(layout, fake, image)
    vm.suspend()
    good = vm.files.launch.read_text()
    for damaged in ("{not json", '{"schema_version": 1, "spec": {}}', json.dumps({**json.loads(good), "spec": {}}),
                    json.dumps({**json.loads(good), "spec": "x"})):
        vm.files.launch.write_text(damaged)
        with pytest.raises((StateError, VMError), match="cannot be resumed") as caught:
            vm.resume()
        assert "mvmctl down web" in (caught.value.hint or "")
        assert vm.info().status is mvm.VMStatus.SUSPENDED and vm.files.saved_state.is_file()
    assert mvm.down("web", layout=layout).how == "not running; its saved state discarded"
    _nothing_left(layout, fake)


def test_a_detached_child_outlives_its_popen_without_a_warning(tmp_path: Path) -> None:
    """QEMU outlives the ``up`` that spawned it: dropping the Popen must not warn (pytest
    turns the ResourceWarning into an error), and the child is reaped by pid."""
    import gc
    import warnings

    from mvm import _pids

    proc = DEFAULT_RUNNER.spawn(["sleep", "30"], stdout=subprocess.DEVNULL, cwd=tmp_path)
    pid, started = proc.pid, _pids.start_time(proc.pid)
    _pids.detach(proc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del proc
        gc.collect()
    assert _pids.alive(pid, started)
    os.kill(pid, 9)
    assert _pids.wait_gone(pid, started, 5.0)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left
    helper = DEFAULT_RUNNER.spawn(["true"], stdout=subprocess.DEVNULL, cwd=tmp_path)  # a helper that ends
    _pids.detach(helper)
    helper_pid = helper.pid
    del helper
    deadline = time.monotonic() + 5
    while helper_pid in _pids._DETACHED and time.monotonic() < deadline:
        _pids.reap_detached()
        time.sleep(0.02)
    assert helper_pid not in _pids._DETACHED and not Path(f"/proc/{helper_pid}").exists()


def test_kvm_for_a_qemu_user_of_its_own_needs_a_group_for_dev_kvm(layout: Layout, fake: FakeBackend,
                                                                  image: Image,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm._api import machines
    from mvm.backends.base import MachineRequest, Preflight
    from mvm.runtime import machine_users

    monkeypatch.setattr(fake, "preflight", lambda request: Preflight("kvm", "the probe booted"))
    monkeypatch.setattr(machine_users, "confining", lambda: True)
    monkeypatch.setattr(machine_users, "kvm_group", lambda: None)
    request = MachineRequest(name="web", kernel=image.kernel, initrd=image.initrd, probe_cache=layout.probes)
    verdict = machines.preflight(fake, request)  # auto: falls back to TCG and says why
    assert verdict.accel == "tcg" and "/dev/kvm is open to no group" in verdict.reason
    explicit = MachineRequest(name="web", kernel=image.kernel, initrd=image.initrd, probe_cache=layout.probes,
                              accel="kvm")
    assert machines.preflight(fake, explicit).accel == "kvm"  # refused when it starts:
    monkeypatch.setattr(machine_users, "LOCKS", layout.state / "users")
    with pytest.raises(BootError, match="/dev/kvm") as info:
        _up(layout, fake, image, hypervisor="qemu-kvm")
    assert "chgrp" in (info.value.hint or "")
    _nothing_left(layout, fake)
    monkeypatch.setattr(machine_users, "kvm_group", lambda: 994)
    assert machines.preflight(fake, request).accel == "kvm"


def test_a_template_on_a_full_disk_is_refused_before_it_boots(layout: Layout, fake: FakeBackend, image: Image,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    def statvfs(path: object) -> os.statvfs_result:
        fields = list(real(path))  # type: ignore[arg-type]
        fields[0] = fields[1] = 4096
        fields[4] = (300 << 20) // 4096  # 300 MB free: a 512 MB machine's template needs twice that
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(mvm.DiskFull, match="saving a template of a 512 MiB machine"):
        make_template(image, cpus=1, memory=512, layout=layout, backend=fake)
    assert not fake.machines, "a machine was started"
    assert not [p for p in layout.templates.iterdir() if not p.name.endswith(".lock")]


def test_a_disk_that_fills_up_while_a_template_is_saved_leaves_nothing(layout: Layout, fake: FakeBackend,
                                                                        image: Image,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fake, "save", full)
    with pytest.raises(OSError, match="No space left"):  # the CLI makes it a one-line DiskFull
        make_template(image, cpus=1, memory=512, layout=layout, backend=fake)
    assert not [m for m in fake.machines.values() if m.running], "the template's machine was left running"
    assert not [p for p in layout.templates.iterdir() if not p.name.endswith(".lock")]
    assert TemplateStore(layout).all() == []


def test_cp_names_a_vm_that_is_not_there(layout: Layout, tmp_path: Path) -> None:
    with pytest.raises(VMNotFound, match="no VM named 'nosuch'"):
        mvm.cp("nosuch:/etc/hostname", str(tmp_path / "x"), layout=layout)
    with pytest.raises(VMNotFound, match="no VM named 'gone'"):
        mvm.cp(str(tmp_path), "gone:/tmp", layout=layout)
    with pytest.raises(UsageError, match="give NAME:/path on one side"):  # two host paths
        mvm.cp(str(tmp_path), str(tmp_path / "y"), layout=layout)


def test_rmi_takes_the_images_templates_with_it(template: Template, layout: Layout, fake: FakeBackend,
                                                image: Image) -> None:
    """They were left behind (hundreds of MB each), listed by `template ls` as of no image."""
    from mvm.builders.store import ImageStore, Manifest

    def make(staging: Path) -> Manifest:
        (staging / "rootfs.ext4").write_bytes(b"x")
        return image.manifest

    ImageStore(layout.images).publish(image.key, make)  # the store's copy of the fixture's image
    vm = _up(layout, fake, image)  # restored: it links what it needs from the template
    assert vm.info().start == "restored"
    vm.suspend()
    vm.down()
    assert template.path.exists()
    mvm.rmi(image.key, layout=layout)
    assert not template.path.exists() and mvm.templates(layout=layout) == []


def _stored(layout: Layout, image: Image) -> Image:
    """The store's copy of the fixture's image (what a build gives `up`)."""
    from mvm.builders.store import ImageStore, Manifest

    def make(staging: Path) -> Manifest:
        for name in ("vmlinux", "rootfs.ext4"):
            (staging / name).write_bytes(b"x")
        return image.manifest

    return ImageStore(layout.images).publish(image.key, make)


def test_an_image_removed_before_up_took_it_fails_that_up_cleanly(layout: Layout, fake: FakeBackend,
                                                                  image: Image) -> None:
    """`rmi` (or `cleanup`) ran between the build and the VM's record: the `up` says so."""
    stored = _stored(layout, image)
    mvm.rmi(image.key, layout=layout)
    with pytest.raises(StateError, match=f"image {image.key[:12]} of web was removed") as caught:
        _up(layout, fake, stored)
    assert "run the same `mvmctl up` again" in (caught.value.hint or "")
    _nothing_left(layout, fake)


def test_cleanup_keeps_an_image_an_up_took_while_it_looked(layout: Layout, fake: FakeBackend, image: Image,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Cleanup picks the unused images, an `up` takes one, cleanup removes the others: the
    `up`'s record, written under the image's lock, is what the removal checks under it."""
    from mvm._api import cleanup as cleanup_module

    stored = _stored(layout, image)
    picked = cleanup_module._unused_images
    vms: list[mvm.VM] = []

    def up_meanwhile(*args: Any) -> list[CleanupItem]:
        items = picked(*args)
        assert [Path(i.path).name for i in items] == [image.key]  # unused when cleanup looked
        vms.append(_up(layout, fake, stored))
        return items

    monkeypatch.setattr(cleanup_module, "_unused_images", up_meanwhile)
    report = mvm.cleanup(layout, keep=0)
    assert not [i for i in report.items if i.kind == "image"]
    assert f"kept: image {image.key[:12]}, which web started using while cleanup looked" in report.notes
    assert stored.path.is_dir() and vms[0].status == "running"
    with pytest.raises(UsageError, match="used by running or suspended VM.*: web"):
        mvm.rmi(image.key, layout=layout)
    vms[0].down()
    assert [i.key for i in mvm.rmi(image.key, layout=layout)] == [image.key]
    assert not ImageStore(layout.images).lock_path(image.key).exists()


def test_template_rm_says_what_restored_vms_still_hold(template: Template, layout: Layout, fake: FakeBackend,
                                                      image: Image) -> None:
    """A clone links the template's root disk and RAM: removing the template frees them only
    once the clone is down, and `template rm` must not claim otherwise."""
    vm = _up(layout, fake, image)
    assert vm.info().start == "restored"
    [listed] = mvm.templates(layout=layout)
    assert 0 < listed.bytes_shared < listed.bytes_on_disk  # its RAM and root disk, not its logs
    info = mvm.template_rm(listed.key, layout=layout)
    assert info.bytes_shared == listed.bytes_shared and not template.path.exists()
    vm.down()


def test_template_rm_takes_a_guest_name_and_says_why_not(template: Template, layout: Layout,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm._api import templates

    [listed] = mvm.templates(layout=layout)
    with pytest.raises(UsageError, match="no template 'abc' .* needs at least 4 characters"):
        mvm.template_rm("abc", layout=layout)
    # the image fixture is not in the store, so the listing cannot name its guest: name it
    named = listed.model_copy(update={"name": "web"})
    monkeypatch.setattr(templates, "templates_list", lambda layout: [named])
    assert mvm.template_rm("web", layout=layout).key == listed.key and not template.path.exists()
    monkeypatch.setattr(templates, "templates_list", lambda layout: [named, named.model_copy(update={"key": "f" * 32})])
    with pytest.raises(UsageError, match="'web' names 2 templates"):
        mvm.template_rm("web", layout=layout)


def test_a_template_gives_up_on_a_check_that_keeps_failing_and_says_so(layout: Layout, fake: FakeBackend,
                                                                       image: Image) -> None:
    """A check failing probe after probe will not turn healthy in time to be worth a VM (the
    maker's used to run its full 120 s); `template create` says why it has no ready state."""
    fake.status["health"] = {"check": {"state": "unhealthy", "failures": 3, "last_exit": 1}}
    notes: list[str] = []

    class Notes:
        def stage(self, name: str) -> None: ...
        def line(self, text: str) -> None: ...
        def note(self, text: str) -> None:
            notes.append(text)

    started = time.monotonic()
    template = make_template(image, cpus=1, memory=512, layout=layout, backend=fake, progress=Notes())
    assert template.meta.kinds == ["agent"] and time.monotonic() - started < 10
    assert notes == ["no ready state: check check failed 3 probes in a row (last exit 1); its clones start their "
                     "services anew"]


def test_a_template_waits_for_health_no_longer_than_asked(layout: Layout, fake: FakeBackend, image: Image) -> None:
    """The pytest fixture passes its test's health timeout: a guest not healthy as it is stalled
    each new image's first test for the maker's 120 s, whatever the test asked for."""
    started = time.monotonic()
    template = make_template(image, cpus=1, memory=512, layout=layout, backend=fake, health_timeout=0.0)
    assert template.meta.kinds == ["agent"] and time.monotonic() - started < 5.0
    vm = _up(layout, fake, image)  # nothing healthy to restore: a cold boot, which says why
    assert vm.info().start == "cold" and "no 'ready' state" in vm.info().start_reason
    vm.down()


def test_exec_refuses_a_string_command_and_a_zero_timeout(layout: Layout, fake: FakeBackend, image: Image) -> None:
    """`vm.exec("cat /etc/hostname")` ran 'c' 'a' 't'... (exit 127); a timeout of 0 meant none.
    Its words or one list of them are the command, as the pytest fixture's VM takes it."""
    vm = _up(layout, fake, image)
    with pytest.raises(UsageError, match="give the command as separate words") as caught:
        vm.exec("cat /etc/hostname")
    assert caught.value.hint and "exec('cat', '/etc/hostname')" in caught.value.hint
    assert vm.exec("echo", "hi").stdout == vm.exec(["echo", "hi"]).stdout == b"echo hi\n"  # the fake echoes
    # one word with a space, in a list: what it says (mvmctl exec VM -- "/opt/My App/run" passes this)
    assert vm.exec(["/opt/My App/run"]).stdout == b"/opt/My App/run\n"
    with pytest.raises(UsageError, match="timeout=0: must be more than 0"):
        vm.exec(["true"], timeout=0)
    with pytest.raises(UsageError, match="'A=B' is not a valid variable name"):
        vm.exec(["true"], env={"A=B": "1"})
    vm.down()


def test_export_of_a_vm_name_says_how_to_export_its_image(layout: Layout, fake: FakeBackend, image: Image,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "web" is no directory here
    vm = _up(layout, fake, image, ports=["8080:80"], env={"TOKEN": "x"})
    with pytest.raises(UsageError, match="'web' is neither a spec directory nor an image") as caught:
        mvm.export_kubevirt("web", out=tmp_path / "out", layout=layout)
    assert caught.value.hint == (f"web is a VM; export its image, with what it was started with: "
                                 f"mvmctl export {image.key[:12]} --name web -p 80 -e TOKEN=...")
    vm.down()


def test_restarts_up_again_hint_starts_the_vm_as_it_was_started() -> None:
    """The hint of a restart that cannot keep its VM: a flake VM's `up` names the flake, and an
    emulated VM's its architecture (`up .` would build ./mvm.toml for this host)."""
    from mvm._api.restart import _up_again
    from mvm.names import host_arch
    from mvm.runtime.registry import VMRecord

    other = "aarch64" if host_arch() == "x86_64" else "x86_64"
    toml = VMRecord(name="web", source="/srv/app/mvm.toml", arch=other)
    assert _up_again(toml) == f"mvmctl up /srv/app/mvm.toml --name web --arch {other} --cpus 1 --memory 512"
    flake = VMRecord(name="web", frontend="nix", source="path:/srv/my app", arch=host_arch())
    assert _up_again(flake, shape=False) == "mvmctl up --flake 'path:/srv/my app' --name web"
    named = VMRecord(name="web", frontend="nix", source=f".#packages.{other}-linux.default", arch=other)
    assert _up_again(named, shape=False) == f"mvmctl up --flake '.#packages.{other}-linux.default' --name web"
    # the shape and what restart keeps: the VM the hint starts is the one that was (review)
    shaped = VMRecord(name="web", source="/a/mvm.toml", arch=host_arch(), cpus=2, memory=1024, hypervisor="qemu-tcg",
                      log_limit_mb=8, start_reason="--cold")
    assert _up_again(shaped) == ("mvmctl up /a/mvm.toml --name web --cpus 2 --memory 1024 --hypervisor qemu-tcg "
                                 "--log-limit 8 --cold")


def test_down_without_logs_of_a_gone_vm_drops_the_logs_a_down_kept(tmp_path: Path) -> None:
    """The pytest plugin's `down(keep_logs=False)` at teardown, after the test's own `vm.down()`
    kept its logs: nothing of the VM stays. With keep_logs (the CLI's) the kept logs stay."""
    import mvm

    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    kept = layout.retained_logs / "web"
    kept.mkdir(parents=True)
    (kept / "console.log").write_text("boot\n")
    with pytest.raises(mvm.VMNotFound):
        mvm.down("web", layout=layout)
    assert (kept / "console.log").exists()
    assert [line.text for line in mvm.logs("web", layout=layout)] == ["boot"]
    with pytest.raises(mvm.VMNotFound):
        mvm.down("web", layout=layout, keep_logs=False)
    assert not kept.exists() and not list(layout.retained_logs.iterdir())


def test_a_guest_refusal_whose_start_was_undone_does_not_send_the_user_to_the_vm(
        layout: Layout, fake: FakeBackend, image: Image, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone whose guest refused its config (a -v over /usr/lib): the start is undone, and
    the hint said `mvmctl status web` and `mvmctl logs web` (no such VM; another run's logs)."""
    from mvm.errors import AgentError

    request.getfixturevalue("template")
    monkeypatch.setattr(ImageStore, "get", lambda self, key: image if key == image.key else None)

    def refuse(self: Launch, *args: object) -> None:
        raise AgentError(self.plan.name, "the guest refused 'configure': No module named 'mvm.guest.health'")

    monkeypatch.setattr(Launch, "personalize", refuse)
    with pytest.raises(AgentError) as caught:
        _up(layout, fake, image)
    assert "nothing of web was kept" in (caught.value.hint or "") and "mvmctl status" not in (caught.value.hint or "")
    _nothing_left(layout, fake)


def test_an_image_a_vm_of_another_state_dir_uses_is_kept(layout: Layout, fake: FakeBackend, image: Image,
                                                          tmp_path: Path) -> None:
    """MVM_HOME=a and b sharing MVM_CACHE: b's rmi removed the image of a's suspended VM, which
    could then never resume (hands-on). b's rmi and cleanup now see a's VM, and say how to stop it."""
    stored = _stored(layout, image)
    other = Layout(state=tmp_path / "other-state", cache=layout.cache)
    vm = _up(layout, fake, stored)
    vm.suspend()
    with pytest.raises(UsageError, match=f"used by running or suspended VM.s.: MVM_STATE={layout.state} web") as caught:
        mvm.rmi(image.key, layout=other)
    assert f"MVM_STATE={layout.state} mvmctl down web" in (caught.value.hint or "")
    assert not [i for i in mvm.cleanup(other, keep=0).items if i.kind == "image"]
    assert stored.path.is_dir()
    vm.down()  # its marker goes with it
    assert [i.key for i in mvm.rmi(image.key, layout=other)] == [image.key]
    assert not (layout.cache / "images" / ".users" / image.key).exists()


def test_a_stale_image_mark_refuses_nothing(layout: Layout, fake: FakeBackend, image: Image, tmp_path: Path) -> None:
    """Marks that outlived their meaning: a new VM of the same name on another image, a VM of
    another state dir that has exited. Neither may keep an image; one that is suspended does."""
    from mvm.builders.store import ImageStore
    from mvm.runtime.registry import VMRecord

    _stored(layout, image)
    other = Layout(state=tmp_path / "b", cache=layout.cache)
    vm_dir = other.vms / "web"
    vm_dir.mkdir(parents=True)
    ImageStore(layout.images).add_user(image.key, vm_dir)

    def record(**fields: object) -> None:
        (vm_dir / "vm.json").write_text(VMRecord(name="web", **fields).model_dump_json())  # type: ignore[arg-type]

    record(image_key="x" * 32, phase="running")  # a new VM of that name, on another image
    assert mvm.rmi(image.key, layout=layout)[0].key == image.key  # not refused
    _stored(layout, image)
    ImageStore(layout.images).add_user(image.key, vm_dir)
    record(image_key=image.key, phase="running")  # its machine is not there: exited
    assert mvm.rmi(image.key, layout=layout)[0].key == image.key
    _stored(layout, image)
    ImageStore(layout.images).add_user(image.key, vm_dir)
    record(image_key=image.key, phase="suspended")
    (vm_dir / "suspended.state").write_bytes(b"x")
    with pytest.raises(UsageError, match="used by running or suspended"):
        mvm.rmi(image.key, layout=layout)


def test_a_template_of_a_one_shot_that_has_exited_is_made_at_once(layout: Layout, fake: FakeBackend,
                                                                  image: Image) -> None:
    """A service that exited 0 for good (a one-shot under restart = "on-failure") never counted
    as settled: the maker's hidden 512 MiB VM waited its whole 120 s, then saved no ready state."""
    fake.status["services"] = {"svc": {"state": "exited", "restarts": 0, "last_exit": 0, "restart": "on-failure"}}
    started = time.monotonic()
    template = make_template(image, cpus=1, memory=512, layout=layout, backend=fake)
    assert template.meta.kinds == ["agent", "ready"] and time.monotonic() - started < 10


def test_a_suspended_vm_whose_host_port_was_taken_can_have_its_forward_moved(layout: Layout, fake: FakeBackend,
                                                                              image: Image) -> None:
    """Its host port taken while it was suspended, `resume` was refused with `up`'s hint (-p),
    and `forward --rm` was refused as the VM was not running: only `down` was left, losing its state."""
    vm = _up(layout, fake, image, ports=["18200:8080"])
    vm.suspend()
    fake.taken_ports.add(18200)
    with pytest.raises(mvm.PortInUse) as taken:
        vm.resume()
    assert "mvmctl forward web --rm -p HOST:GUEST" in (taken.value.hint or "") and "-p" not in taken.value.message
    with pytest.raises(mvm.UsageError, match="suspended: name the host port"):
        vm.forward("8080")
    vm.unforward("18200:8080")
    assert vm.forward("18201:8080").host_port == 18201
    assert vm.info(ask_guest=False).status is mvm.VMStatus.SUSPENDED
    vm.resume()
    (machine,) = [m for m in fake.machines.values() if m.running]
    assert [(p.host_port, p.guest_port) for p in machine.spec.ports] == [(18201, 8080)]
    vm.down()


def test_a_host_port_another_vm_forwards_is_refused_naming_that_vm(layout: Layout, fake: FakeBackend,
                                                                    image: Image) -> None:
    """`ss` shows a QEMU only; mvm knows which of its VMs holds the port."""
    _up(layout, fake, image, name="a", ports=["18300:8080"])
    fake.taken_ports.add(18300)  # as QEMU's listener holds it
    with pytest.raises(mvm.PortInUse, match=r"host port 18300/tcp is forwarded by VM 'a' \(to its guest port 8080\)"
                       ) as taken:
        _up(layout, fake, image, name="b", ports=["18300:9090"])
    assert "mvmctl forward a --rm -p 127.0.0.1:18300:8080" in (taken.value.hint or "")
    b = _up(layout, fake, image, name="b")
    with pytest.raises(mvm.PortInUse, match="forwarded by VM 'a'"):
        b.forward("18300:9090")
    fake.taken_ports.add(18301)  # something else holds this one: the backend's own words
    with pytest.raises(mvm.PortInUse, match="taken \\(fake\\)"):
        b.forward("18301:9090")


def test_a_vm_that_stops_while_booting_is_said_once(layout: Layout, fake: FakeBackend, image: Image,
                                                      tmp_path: Path) -> None:
    """Its connection reset was what up reported of a QEMU killed while booting; then the new
    wording came out doubled ("the VM stopped while booting (the VM stopped while booting)")."""
    import socket

    from mvm.runtime import agent

    files = VMFiles(tmp_path / "gone")
    files.root.mkdir()
    with pytest.raises(mvm.AgentError) as stopped:  # no socket: the connection fails, the VM is gone
        agent.wait_ready(files, "web", 5.0, lambda: False)
    assert stopped.value.message.startswith("the VM stopped while booting (cannot connect")
    with socket.socket(socket.AF_UNIX) as port:  # a port that takes the ping and never answers
        port.bind(str(files.control(0)))
        port.listen()
        with pytest.raises(mvm.AgentError) as stopped:
            agent.wait_ready(files, "web", 5.0, lambda: False)
    assert stopped.value.message == "the VM stopped while booting"
