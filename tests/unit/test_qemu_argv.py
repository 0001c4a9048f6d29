from pathlib import Path

from mvm.backends.base import Disk, LaunchSpec, PortForward
from mvm.backends.qemu_argv import build_argv, kernel_cmdline
from mvm.paths import VMFiles


def _spec(**kw: object) -> LaunchSpec:
    base = dict(
        name="web", files=VMFiles(Path("/state/vms/web")), kernel=Path("/img/vmlinux"),
        initrd=Path("/img/initrd"), rootfs=Path("/img/rootfs.ext4"), cpus=2, memory=256, accel="tcg",
        ports=[PortForward(8080, 80), PortForward(5353, 53, "0.0.0.0", "udp")],
        disks=[Disk(Path("/vol/data.ext4"), "vol0", False), Disk(Path("/vm/cfg.ext4"), "vol1", True)],
        config_disk=Path("config.img"),
    )
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_argv_uses_microvm_rdrand_and_pvh_kernel() -> None:
    argv = build_argv(_spec())
    assert _opt(argv, "-M") == ["microvm,pcie=on,rtc=on"]
    assert _opt(argv, "-accel")[0].startswith("tcg")
    assert _opt(argv, "-cpu") == ["qemu64,+rdrand,+arat"]
    assert _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["256M"]
    assert _opt(argv, "-kernel") == ["/img/vmlinux"] and _opt(argv, "-initrd") == ["/img/initrd"]
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_kvm_argv_uses_host_cpu() -> None:
    argv = build_argv(_spec(accel="kvm"))
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]


def test_only_the_root_drive_is_a_snapshot() -> None:
    drives = _opt(build_argv(_spec()), "-drive")
    assert "snapshot=on" in drives[0] and "/img/rootfs.ext4" in drives[0]
    assert all("snapshot" not in d for d in drives[1:])
    assert "readonly=on" in drives[1] and "config.img" in drives[1]  # the runtime config disk
    assert "readonly=on" not in drives[2] and "readonly=on" in drives[3]
    devices = _opt(build_argv(_spec()), "-device")
    serials = [d.split("serial=")[1] for d in devices if "serial=" in d]
    assert serials == ["root", "mvm-config", "vol0", "vol1"]


def test_port_forwards_bind_the_given_address() -> None:
    netdev = _opt(build_argv(_spec()), "-netdev")[0]
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in netdev
    assert "hostfwd=udp:0.0.0.0:5353-:53" in netdev


def test_sockets_are_relative_and_sandboxed() -> None:
    argv = build_argv(_spec())
    assert _opt(argv, "-qmp") == ["unix:qmp.sock,server=on,wait=off"]
    chardevs = _opt(argv, "-chardev")
    # the console and events go to the VM's log shim, never straight to a file
    assert "socket,id=ev,path=ev.sock" in chardevs and "socket,id=con,path=con.sock" in chardevs
    assert not [c for c in chardevs if c.startswith("file,")]
    assert any(c.startswith("socket,id=c0,path=c0.sock,server=on") for c in chardevs)
    assert _opt(argv, "-sandbox")[0].startswith("on")


def test_cmdline_boots_mvm_init_quietly() -> None:
    line = kernel_cmdline(_spec())
    assert "init=/usr/lib/mvm/init" in line and "root=/dev/vda" in line
    assert "quiet" in line and "cryptomgr.notests" in line and "panic=-1" in line
