from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from mvm._proc import signals_deferred
from mvm.backends.base import (
    Disk,
    Incoming,
    LaunchSpec,
    MemoryFile,
    PortForward,
    Share,
    spec_from_json,
    spec_to_json,
)
from mvm.backends.host_ports import check_ports_free
from mvm.backends.qemu_argv import build_argv, kernel_cmdline, virtiofsd_argv
from mvm.backends.qemu_handoff import Handoff
from mvm.errors import PortInUse, UsageError
from mvm.paths import VMFiles

from .handoffs import NamingHandoff


def _spec(**kw: object) -> LaunchSpec:
    base = dict(
        name="web", files=VMFiles(Path("/state/vms/web")), kernel=Path("/img/vmlinux"),
        initrd=Path("/img/initrd"), rootfs=Path("/state/vms/web/root.qcow2"),
        root_backing=(Path("/img/rootfs.ext4"),), cpus=2, memory=256, accel="tcg",
        ports=[PortForward(8080, 80), PortForward(5353, 53, "0.0.0.0", "udp")],
        disks=[Disk(Path("/vol/data.ext4"), "vol0", False), Disk(Path("/vm/cfg.ext4"), "vol1", True)],
        config_disk=Path("/state/vms/web/config.img"),
    )
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _nodes(argv: list[str]) -> dict[str, dict[str, Any]]:
    return {doc["node-name"]: doc for doc in map(json.loads, _opt(argv, "-blockdev"))}


def test_tcg_argv_uses_microvm_rdrand_and_pvh_kernel() -> None:
    argv = build_argv(_spec(), NamingHandoff())
    assert _opt(argv, "-M") == ["microvm,pcie=on,rtc=on"]
    assert _opt(argv, "-accel")[0].startswith("tcg")
    assert _opt(argv, "-cpu") == ["qemu64,+rdrand,+arat"]
    assert _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["256M"]
    assert _opt(argv, "-kernel") == ["/img/vmlinux"] and _opt(argv, "-initrd") == ["/img/initrd"]
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_kvm_argv_uses_host_cpu() -> None:
    argv = build_argv(_spec(accel="kvm"), NamingHandoff())
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]


def test_the_root_chain_is_explicit_and_only_the_vms_own_layer_is_written() -> None:
    spec = _spec(root_backing=(Path("/tpl/ready.qcow2"), Path("/img/rootfs.ext4")))
    nodes = _nodes(build_argv(spec, NamingHandoff()))
    root, tpl, base = nodes["d0"], nodes["base1"], nodes["base0"]
    assert root["driver"] == "qcow2" and root["backing"] == "base1" and not root["read-only"]
    assert root["file"]["filename"] == "<rw:/state/vms/web/root.qcow2>"
    assert tpl["driver"] == "qcow2" and tpl["backing"] == "base0" and tpl["read-only"]
    assert tpl["file"]["filename"] == "<ro:/tpl/ready.qcow2>"
    assert base["driver"] == "raw" and base["read-only"] and base["file"]["filename"] == "<ro:/img/rootfs.ext4>"
    assert "backing" not in base  # a raw node has none


def test_drives_in_order_with_their_serials_and_modes() -> None:
    argv = build_argv(_spec(), NamingHandoff())
    nodes = _nodes(argv)
    assert nodes["d1"]["read-only"] and nodes["d1"]["file"]["filename"] == "<ro:/state/vms/web/config.img>"
    assert not nodes["d2"]["read-only"] and nodes["d2"]["file"]["filename"] == "<rw:/vol/data.ext4>"
    assert nodes["d3"]["read-only"] and nodes["d3"]["file"]["filename"] == "<ro:/vm/cfg.ext4>"
    devices = [d for d in _opt(argv, "-device") if d.startswith("virtio-blk-pci")]
    assert [d.split("drive=")[1].split(",")[0] for d in devices] == ["d0", "d1", "d2", "d3"]  # root is vda
    assert [d.split("serial=")[1].split(",")[0] for d in devices] == ["root", "mvm-config", "vol0", "vol1"]
    assert all("write-cache=on" in d for d in devices)
    assert len(_opt(argv, "-add-fd")) == 5  # every image arrives as a descriptor


def test_hot_plugged_disks_come_back_in_their_slots() -> None:
    spec = _spec(disks=[Disk(Path("/vol/data.ext4"), "vol0", False, slot=1)], hotplug_slots=2)
    argv = build_argv(spec, NamingHandoff())
    assert _nodes(argv)["hp1"]["file"]["filename"] == "<rw:/vol/data.ext4>"
    assert "virtio-blk-pci,drive=hp1,id=disk-hp1,bus=rp1,serial=vol0,write-cache=on" in _opt(argv, "-device")


def test_port_forwards_bind_the_given_address() -> None:
    netdev = _opt(build_argv(_spec(), NamingHandoff()), "-netdev")[0]
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in netdev
    assert "hostfwd=udp:0.0.0.0:5353-:53" in netdev


def test_a_restored_machine_opens_its_forwards_only_once_it_runs() -> None:
    """A client connecting while the machine is paused would stall in slirp, not be refused."""
    restored = _spec(incoming=Incoming(Path("/tpl/ready.state"), ignore_shared=True))
    assert "hostfwd" not in _opt(build_argv(restored, NamingHandoff()), "-netdev")[0]
    assert "-incoming" in build_argv(restored, NamingHandoff())


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_a_restored_machine_is_not_handed_a_kernel(arch: str) -> None:
    """Its RAM comes from the saved state: loading the kernel and initrd again only cost it
    ~60 ms of QEMU start-up (a 27 MB arm64 Image)."""
    booted = build_argv(_spec(arch=arch), NamingHandoff())
    restored = build_argv(_spec(arch=arch, incoming=Incoming(Path("/tpl/ready.state"), ignore_shared=True)),
                          NamingHandoff())
    assert all(flag in booted for flag in ("-kernel", "-initrd", "-append"))
    assert not any(flag in restored for flag in ("-kernel", "-initrd", "-append"))


def test_qemu_opens_no_path_itself_and_is_sandboxed() -> None:
    handoff = NamingHandoff()
    argv = build_argv(_spec(memory_file=MemoryFile(Path("/tpl/ready.ram"), shared=False)), handoff)
    chardevs = _opt(argv, "-chardev")
    # sockets are mvm's, passed in: the monitor and control ports listening, the console and
    # events one end of a pair whose other end is the log shim's
    assert not [c for c in chardevs if "path=" in c or c.startswith("file,")]
    assert sorted(handoff.sockets.values()) == sorted(
        ["listen:qmp.sock", "pair:console", "pair:events", *(f"listen:c{i}.sock" for i in range(4))])
    assert _opt(argv, "-mon") == ["chardev=mon,mode=control"]
    assert "mem-path=/tpl/ready.ram,share=off" in _opt(argv, "-object")[0]
    assert _opt(argv, "-sandbox")[0].startswith("on") and "elevateprivileges=deny" in _opt(argv, "-sandbox")[0]


def test_the_real_handoff_opens_each_file_with_its_access_mode(tmp_path: Path) -> None:
    for name in ("root.qcow2", "rootfs.ext4", "config.img", "vmlinux"):
        (tmp_path / name).write_bytes(b"x")
    spec = _spec(files=VMFiles(tmp_path), kernel=tmp_path / "vmlinux", initrd=None, rootfs=tmp_path / "root.qcow2",
                 root_backing=(tmp_path / "rootfs.ext4",), config_disk=tmp_path / "config.img", disks=[])
    with Handoff() as handoff:
        argv = build_argv(spec, handoff)
        fdsets = {f"/dev/fdset/{opt.split('set=')[1]}": int(opt.split(",")[0][3:]) for opt in _opt(argv, "-add-fd")}
        nodes = _nodes(argv)
        for node, want in (("d0", os.O_RDWR), ("base0", os.O_RDONLY), ("d1", os.O_RDONLY)):
            fd = fdsets[nodes[node]["file"]["filename"]]
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == want, node
        kernel = _opt(argv, "-kernel")[0]
        assert os.path.samefile(kernel, tmp_path / "vmlinux")
        assert (tmp_path / "qmp.sock").is_socket() and (tmp_path / "qmp.sock").stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(tmp_path / "c0.sock"))  # listening already, before QEMU exists
        assert set(handoff.peers) == {"console", "events"}
        opened = list(handoff.fds)
    for fd in opened:  # closed once handed over
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"fd {fd} still open")


def test_cmdline_boots_mvm_init_quietly() -> None:
    line = kernel_cmdline(_spec())
    assert "init=/usr/lib/mvm/init" in line and "root=/dev/vda" in line
    assert "quiet" in line and "cryptomgr.notests" in line and "panic=-1" in line


def test_an_interrupt_while_a_child_starts_waits_for_its_undo() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever other tests left
    try:
        steps: list[str] = []
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # lands "inside Popen"
            steps.append("started")
            steps.append("undo armed")
        assert steps == ["started", "undo armed"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_taken_host_port_is_named_with_a_free_one_to_use_instead() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse) as caught:
            check_ports_free([PortForward(port, 8080)])
        hint = caught.value.hint or ""
        match = re.search(r"-p (\d+):8080 \(free now\)", hint)
        assert match and int(match[1]) != port, hint
        with socket.socket() as s:  # the suggested port can really be had
            s.bind(("127.0.0.1", int(match[1])))


def test_a_host_address_that_is_not_this_hosts_is_named_not_the_port() -> None:
    """-p 10.1.2.3:18094:8080: "Cannot assign requested address", and a hint to pick another port."""
    with pytest.raises(UsageError, match="10.1.2.3 is not an address of this host") as caught:
        check_ports_free([PortForward(18094, 8080, "10.1.2.3")])
    assert "-p 18094:8080" in (caught.value.hint or "") and "another host port" not in (caught.value.hint or "")


def test_a_privileged_host_port_is_refused_before_qemu_fails_on_it() -> None:
    first = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if first == 0:
        pytest.skip("this host lets every process bind every port")
    with pytest.raises(PortInUse, match=f"host port {first - 1} is privileged") as caught:
        check_ports_free([PortForward(first - 1, 80)])
    assert "ip_unprivileged_port_start" in (caught.value.hint or "")


def test_virtiofsd_serves_a_users_directory_as_that_user() -> None:
    """Spawned as the owner, root only in a user namespace of its own, on a socket mvm bound
    (no shell: the path travels as one argument)."""
    argv = virtiofsd_argv("/usr/lib/qemu/virtiofsd", Path("/home/a b/$(x)"), 7, as_owner=True)
    assert argv == ["unshare", "--user", "--map-root-user", "--", "/usr/lib/qemu/virtiofsd", "--fd=7",
                    "-o", "source=/home/a b/$(x)", "-o", "cache=auto"]
    as_root = virtiofsd_argv("/usr/lib/qemu/virtiofsd", Path("/srv/p"), 7, as_owner=False)
    assert as_root[0] == "/usr/lib/qemu/virtiofsd" and as_root[-2:] == ["-o", "modcaps=-mknod:-setfcap"]


def test_a_share_is_served_as_its_owner_and_a_root_one_only_where_no_one_can_swap_it(tmp_path: Path) -> None:
    """A second review: the owner was decided by one look at a path virtiofsd opens later; a
    user owning a directory above a root-owned project could swap in their own, to be served
    as root. And the directory's group was used, not the owner's."""
    from mvm._proc import RunAs
    from mvm.backends.qemu_shares import NOGROUP, _share_source
    from mvm.errors import UsageError

    base = tmp_path / "base"
    base.mkdir()
    users = base / "user"
    users.mkdir()
    os.chown(users, 4242, 42)  # no account for 4242; group 42 is not theirs
    assert _share_source(users) == (users, RunAs(4242, NOGROUP))
    assert _share_source(base) == (base, None)  # root's, under root's directories
    roots = users / "roots"
    roots.mkdir()
    with pytest.raises(UsageError, match=f"{users} can be changed by others"):
        _share_source(roots)
    (tmp_path / "link").symlink_to(base)
    assert _share_source(tmp_path / "link")[0] == base  # served where it is, not through the link
    # a third review: group 0 has members too, and an ACL shows only as the group bits
    (base / "proj").mkdir()
    base.chmod(0o775)
    with pytest.raises(UsageError, match="can be changed by others"):
        _share_source(base / "proj")
    base.chmod(0o755)
    real_listxattr = os.listxattr
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "listxattr", lambda p, *a, **k: ["system.posix_acl_access"] if str(p) == str(base)
                      else real_listxattr(p, *a, **k))
        with pytest.raises(UsageError, match="can be changed by others"):
            _share_source(base / "proj")
    assert _share_source(base / "proj") == (base / "proj", None)


def test_launch_json_records_every_field_a_resume_needs() -> None:
    """launch.json is how `resume` starts the machine again: every LaunchSpec field but the
    ones taken anew comes back as it was (a field added to LaunchSpec is recorded with it;
    the hand-written reader this replaced had dropped `starts_services`)."""
    files = VMFiles(Path("/state/vms/web"))
    spec = LaunchSpec(name="web", files=files, kernel=Path("/k"), initrd=None, rootfs=Path("/r"), cpus=2,
                      memory=320, accel="tcg", arch="aarch64",
                      ports=[PortForward(host_port=1, guest_port=2, proto="udp")],
                      disks=[Disk(Path("/d"), "vol1", True, 3)], config_disk=Path("/c"), hold_fds=(7,),
                      shares=[Share("src", Path("/p"))], root_backing=(Path("/a"), Path("/b")),
                      memory_file=MemoryFile(Path("/m"), False), hotplug_slots=2, kernel_args=("x=1",),
                      log_limit=5, starts_services=False, incoming=Incoming(Path("/s"), True))
    doc = json.loads(json.dumps(spec_to_json(spec)))
    assert not {"files", "hold_fds", "incoming", "run_as"} & set(doc)
    assert spec_from_json(doc, files) == dataclasses.replace(spec, hold_fds=(), incoming=None)
    with pytest.raises(ValueError):
        spec_from_json({**doc, "cpus": "two"}, files)


def test_the_tsc_rate_is_the_tsc_s_not_the_core_clock_of_the_moment() -> None:
    """A laptop's core at 3.4 GHz of a 2.6 GHz TSC: the guest is told 2.6 GHz (bogomips / 2),
    else its clock runs fast; no TSC, no rate."""
    from mvm.backends.qemu_argv import tsc_khz_of

    laptop = ("processor\t: 0\ncpu MHz\t\t: 3400.012\nflags\t\t: fpu tsc constant_tsc\nbogomips\t: 5192.30\n\n"
              "processor\t: 1\ncpu MHz\t\t: 800.000\nbogomips\t: 5192.30\n")
    assert tsc_khz_of(laptop) == 2596150
    assert tsc_khz_of("cpu MHz\t\t: 2596.150\nflags\t\t: fpu tsc\n") == 2596150  # no bogomips line
    assert tsc_khz_of("cpu MHz\t\t: 2596.150\nflags\t\t: fpu\nbogomips\t: 5192.30\n") is None
    assert tsc_khz_of("") is None


def test_only_qemu_in_a_vm_dir_is_taken_for_its_machine(tmp_path: Path) -> None:
    """`resume` took the machine an interrupted resume left from every process in the VM dir:
    a user's shell there would have been waited on, then stopped (review)."""
    import shutil
    import subprocess

    from mvm.backends.qemu import QemuBackend

    files = VMFiles(tmp_path / "vm")
    files.root.mkdir()
    fake_qemu = tmp_path / "qemu-system-x86_64"
    shutil.copy("/bin/sleep", fake_qemu)
    shell = subprocess.Popen(["sleep", "30"], cwd=files.root)
    machine = subprocess.Popen([str(fake_qemu), "30"], cwd=files.root)
    try:
        assert [m.pid for m in QemuBackend().strays(files)] == [machine.pid]
    finally:
        for proc in (shell, machine):
            proc.kill()
            proc.wait()
