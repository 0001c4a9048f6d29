"""Guest architectures without a VM: the two machine profiles' QEMU command lines, the
accelerator choice (native -> the KVM probe, foreign -> TCG and one line), the image side
(kernel files, kernels and layers per architecture, the spec's ``arch``), Nix's system
fallback and its errors, and what orchestration records."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from mvm._proc import Completed
from mvm.backends import accel
from mvm.backends.base import LaunchSpec, MemoryFile, PortForward
from mvm.backends.qemu_argv import PROFILES, build_argv, kernel_cmdline
from mvm.builders import arches, kernel, nix, nixerrors
from mvm.builders.debian import image_key
from mvm.builders.layer import Layer
from mvm.errors import BuildError, SpecError, UsageError
from mvm.paths import Layout, VMFiles
from mvm.spec import GuestSpec, Service, parse_spec

from .handoffs import NamingHandoff

HOST = "x86_64"


@pytest.fixture(autouse=True)
def _x86_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests describe an x86_64 host, wherever they run."""
    monkeypatch.setattr("platform.machine", lambda: HOST)


def _spec(**kw: object) -> LaunchSpec:
    base: dict[str, Any] = dict(
        name="web", files=VMFiles(Path("/state/vms/web")), kernel=Path("/img/Image"), initrd=Path("/img/initrd"),
        rootfs=Path("/img/rootfs.ext4"), cpus=2, memory=256, accel="tcg", arch="aarch64",
        ports=[PortForward(8080, 80)], config_disk=Path("config.img"),
    )
    base.update(kw)
    return LaunchSpec(**base)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- the machine profiles -------------------------------------------------------------------


def test_aarch64_tcg_argv_is_virt_with_virtio_pci_and_a_pl011_console() -> None:
    argv = build_argv(_spec(), NamingHandoff())
    assert argv[0] == "qemu-system-aarch64"
    assert _opt(argv, "-M") == ["virt"] and _opt(argv, "-cpu") == ["cortex-a72"]
    assert _opt(argv, "-accel") == ["tcg,tb-size=64"]  # 32 MiB costs an arm64 boot 1.2 s
    assert _opt(argv, "-kernel") == ["/img/Image"] and _opt(argv, "-initrd") == ["/img/initrd"]
    devices = _opt(argv, "-device")
    assert all(d.startswith(("virtio-blk-pci", "virtio-net-pci", "virtio-serial-pci", "virtserialport"))
               for d in devices), devices
    assert "-no-reboot" in argv  # PSCI power-off ends QEMU; a panic must not reboot
    line = kernel_cmdline(_spec())
    assert line.startswith("console=ttyAMA0 ") and " kpti=0" in line
    assert "tsc" not in line and "ttyS0" not in line


def test_aarch64_under_kvm_uses_the_host_cpu_and_keeps_kpti() -> None:
    argv = build_argv(_spec(accel="kvm"), NamingHandoff())
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-M") == ["virt,gic-version=host"]  # GICv3 hosts without GICv2 emulation
    assert "kpti=0" not in kernel_cmdline(_spec(accel="kvm"))


def test_x86_64_profile_is_unchanged() -> None:
    spec = _spec(arch="x86_64", kernel=Path("/img/vmlinux"))
    argv = build_argv(spec, NamingHandoff())
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-M") == ["microvm,pcie=on,rtc=on"] and _opt(argv, "-cpu") == ["qemu64,+rdrand,+arat"]
    line = kernel_cmdline(spec)
    assert line.startswith("console=ttyS0 ") and "tsc=reliable" in line and "kpti" not in line


def test_the_translation_cache_is_larger_where_services_start_from_nothing() -> None:
    """x86_64: 64 MiB for a boot or a restore before the services started, 32 for a clone
    whose services run (its memory is what density is about); aarch64: 64 always."""
    x86 = _spec(arch="x86_64", kernel=Path("/img/vmlinux"))
    assert _opt(build_argv(x86, NamingHandoff()), "-accel") == ["tcg,tb-size=64"]
    x86.starts_services = False
    assert _opt(build_argv(x86, NamingHandoff()), "-accel") == ["tcg,tb-size=32"]
    assert _opt(build_argv(_spec(starts_services=False), NamingHandoff()), "-accel") == ["tcg,tb-size=64"]
    x86.accel = "kvm"
    assert _opt(build_argv(x86, NamingHandoff()), "-accel") == ["kvm"]


def test_both_profiles_share_the_agent_channel_forwards_and_template_devices() -> None:
    """What restore and the agent need is the same device set on both machines."""
    def tail(arch: str) -> list[str]:
        spec = _spec(arch=arch, memory_file=MemoryFile(Path("ram"), shared=True), hotplug_slots=2)
        argv = build_argv(spec, NamingHandoff())
        return argv[argv.index("-blockdev"):]

    assert tail("x86_64") == tail("aarch64")
    argv = build_argv(_spec(memory_file=MemoryFile(Path("ram"), shared=True), hotplug_slots=2),
                      NamingHandoff())
    assert _opt(argv, "-M") == ["virt,memory-backend=mem"]
    assert "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=2" in _opt(argv, "-device")
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in _opt(argv, "-netdev")[0]


def test_profiles_cover_every_architecture() -> None:
    assert set(PROFILES) == {"x86_64", "aarch64"}
    assert all("max" not in p.cpu["tcg"] for p in PROFILES.values())  # -cpu max: 4.4x slower arm64 boot


# -- the accelerator --------------------------------------------------------------------------


def test_a_foreign_guest_is_emulated_and_says_so(tmp_path: Path) -> None:
    verdict = accel.choose("auto", tmp_path / "Image", None, tmp_path, arch="aarch64")
    assert verdict.accel == "tcg"
    assert verdict.emulated is not None and verdict.emulated.startswith("aarch64 guest on an x86_64 host")
    assert "\n" not in verdict.emulated and "slower" in verdict.emulated
    assert accel.choose("tcg", tmp_path / "Image", None, tmp_path, arch="aarch64").emulated
    with pytest.raises(UsageError, match="KVM cannot run an aarch64 guest"):
        accel.choose("kvm", tmp_path / "Image", None, tmp_path, arch="aarch64")
    assert accel.kvm_verdict(tmp_path / "Image", None, tmp_path, arch="aarch64") == (
        False, "KVM runs only x86_64 guests here")


def test_one_kvm_probe_serves_every_image_linking_the_same_kernel(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Images hard-link the cached kernel: a new build must not pay the probe again (6 s
    where /dev/kvm hangs). Another kernel is probed anew."""
    probes: list[Path] = []

    def probe(kernel: Path, *args: object, **kw: object) -> tuple[bool, str]:
        probes.append(kernel)
        return False, "did not reach init"

    monkeypatch.setattr(accel, "run_probe", probe)
    monkeypatch.setattr(accel.os.path, "exists", lambda p: True)
    monkeypatch.setattr(accel.os, "access", lambda p, mode: True)
    monkeypatch.setattr(accel, "require_tool", lambda name: "/bin/sh")
    cached = tmp_path / "kernels" / "vmlinux"
    cached.parent.mkdir()
    cached.write_bytes(b"kernel")
    for image in ("a", "b"):
        (tmp_path / image).mkdir()
        os.link(cached, tmp_path / image / "vmlinux")
        verdict = accel.kvm_verdict(tmp_path / image / "vmlinux", None, tmp_path / "probes", arch="x86_64")
        assert verdict == (False, "did not reach init")
    assert probes == [tmp_path / "a" / "vmlinux"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "vmlinux").write_bytes(b"kernel")  # same bytes, another file: probed
    accel.kvm_verdict(tmp_path / "c" / "vmlinux", None, tmp_path / "probes", arch="x86_64")
    assert len(probes) == 2


def test_a_native_guest_is_not_marked_emulated(tmp_path: Path) -> None:
    verdict = accel.choose("tcg", tmp_path / "vmlinux", None, tmp_path, arch="x86_64")
    assert verdict.accel == "tcg" and verdict.emulated is None


def test_the_kvm_probe_boots_the_profile_of_its_architecture() -> None:
    x86 = accel.probe_argv(Path("k"), None, "qemu-system-x86_64", "x86_64")
    arm = accel.probe_argv(Path("k"), Path("i"), "qemu-system-aarch64", "aarch64")
    assert _opt(x86, "-M") == ["microvm,pcie=on,rtc=on"] and "console=ttyS0" in _opt(x86, "-append")[0]
    assert _opt(arm, "-M") == ["virt,gic-version=host"] and _opt(arm, "-cpu") == ["host"]
    assert _opt(arm, "-accel") == ["kvm"]
    assert "console=ttyAMA0" in _opt(arm, "-append")[0] and _opt(arm, "-initrd") == ["i"]


# -- kernels and images ------------------------------------------------------------------------


def _elf(machine: int) -> bytes:
    return b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 9 + struct.pack("<HH", 2, machine) + b"\0" * 64


def test_kernel_files_tell_their_architecture(tmp_path: Path) -> None:
    files = {
        "vmlinux": _elf(62),
        "arm-vmlinux": _elf(183),
        "bzImage": b"\0" * 0x202 + b"HdrS" + b"\0" * 16,
        "Image": b"MZ" + b"\0" * 0x36 + b"ARMd" + b"\0" * 16,
        "junk": b"nothing",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    found = {name: arches.kernel_arch(tmp_path / name) for name in files}
    assert found == {"vmlinux": "x86_64", "arm-vmlinux": "aarch64", "bzImage": "x86_64", "Image": "aarch64",
                     "junk": None}
    assert arches.image_arch(tmp_path / "junk", "packages.aarch64-linux.default") == "aarch64"
    assert arches.image_arch(tmp_path / "junk", "hello") == HOST
    assert arches.is_arm64_image(files["Image"]) and not arches.is_arm64_image(files["bzImage"])


class AptRunner:
    """Answers ``apt-cache depends`` the way apt does for a foreign package (``:arm64`` added)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str | os.PathLike[str]], *, desc: str, **kw: Any) -> Completed:
        args = [os.fspath(a) for a in argv]
        self.calls.append(args)
        name = args[-1].split(":")[0]
        version = "6.1.0-57-cloud-arm64" if name.endswith("arm64") else "6.1.0-57-cloud-amd64"
        deb = "arm64" if name.endswith("arm64") else "amd64"
        return Completed(args, 0, f"{name}:{deb}\n  Depends: linux-image-{version}:{deb}\n")


def test_the_kernel_package_per_architecture_without_aptitudes_suffix() -> None:
    runner = AptRunner()
    assert kernel.resolve_package(runner, "aarch64") == "linux-image-6.1.0-57-cloud-arm64"  # type: ignore[arg-type]
    assert runner.calls[-1][-1] == "linux-image-cloud-arm64:arm64"
    assert kernel.resolve_package(runner, "x86_64") == "linux-image-6.1.0-57-cloud-amd64"  # type: ignore[arg-type]


def _kernel_dir(root: Path, version: str) -> None:
    (root / version / "lib" / "modules" / version).mkdir(parents=True)
    (root / version / "vmlinux").write_bytes(b"k")


def test_kernels_are_cached_per_architecture(tmp_path: Path) -> None:
    """One shared dir picked the newest name: ...-cloud-arm64 sorts after ...-cloud-amd64."""
    _kernel_dir(tmp_path / "x86_64", "6.1.0-57-cloud-amd64")
    _kernel_dir(tmp_path / "aarch64", "6.1.0-57-cloud-arm64")
    assert [k.version for k in kernel.cached_kernels(tmp_path, "x86_64")] == ["6.1.0-57-cloud-amd64"]
    arm = kernel.cached_kernels(tmp_path, "aarch64")
    assert [(k.version, k.arch) for k in arm] == [("6.1.0-57-cloud-arm64", "aarch64")]
    assert kernel.cached_kernels(tmp_path)[0].arch == HOST


def test_a_foreign_initrd_gets_a_busybox_of_its_own_architecture(tmp_path: Path) -> None:
    fetched: list[list[str]] = []

    class Runner:
        def run(self, argv: Sequence[str | os.PathLike[str]], *, desc: str, cwd: Path | None = None,
                **kw: Any) -> Completed:
            args = [os.fspath(a) for a in argv]
            fetched.append(args)
            if args[0] == "apt-get":
                assert cwd is not None
                (cwd / "busybox-static_1.35_arm64.deb").write_bytes(b"deb")
            else:  # dpkg-deb -x DEB DIR
                (Path(args[-1]) / "bin").mkdir(parents=True)
                (Path(args[-1]) / "bin" / "busybox").write_bytes(b"arm64 busybox")
            return Completed(args, 0, "")

    path = arches.busybox(tmp_path, "aarch64", Runner())  # type: ignore[arg-type]
    assert Path(path).read_bytes() == b"arm64 busybox" and fetched[0][-1] == "busybox-static:arm64"
    assert arches.busybox(tmp_path, "aarch64", Runner()) == path and len(fetched) == 2  # type: ignore[arg-type]


def test_foreign_builds_need_the_binfmt_handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arches, "BINFMT", tmp_path)
    monkeypatch.setattr(arches, "BINFMT_D", tmp_path / "binfmt.d")
    assert arches.emulation_problem("x86_64") is None
    assert "qemu-aarch64 is not registered" in (arches.emulation_problem("aarch64") or "")
    with pytest.raises(BuildError) as info:
        arches.check_can_install("aarch64")
    assert "update-binfmts --enable qemu-aarch64" in (info.value.hint or "")
    # Debian 13: qemu-user-binfmt's register line for systemd-binfmt; update-binfmts has no entry
    (tmp_path / "binfmt.d").mkdir()
    (tmp_path / "binfmt.d" / "qemu-aarch64.conf").write_text(":qemu-aarch64:M::\\x7fELF:...:/usr/bin/qemu:FCP\n")
    assert arches.register_command("aarch64") == \
        f"grep -v '^[#;]' {tmp_path}/binfmt.d/qemu-aarch64.conf > {tmp_path}/register"
    assert "update-binfmts" not in arches.setup_fix("aarch64")
    (tmp_path / "qemu-aarch64").write_text("disabled\n")  # registered, switched off: on again
    assert arches.register_command("aarch64") == f"echo 1 > {tmp_path}/qemu-aarch64"
    (tmp_path / "qemu-aarch64").unlink()
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    assert arches.emulation_problem("aarch64") is None
    (tmp_path / "qemu-aarch64").write_text("disabled\n")
    assert arches.emulation_problem("aarch64") is not None


def test_the_image_key_records_the_architecture() -> None:
    spec = GuestSpec(name="a", services={"web": Service(command="true")})
    layer = Layer(Path("/x"), "k", "id")
    assert image_key(spec, Path("/n"), "6.1", layer, "x86_64") != image_key(spec, Path("/n"), "6.1", layer, "aarch64")


def test_arch_in_mvm_toml() -> None:
    spec = parse_spec({"name": "a", "arch": "aarch64"}, source="mvm.toml")
    assert spec.arch == "aarch64" and "arch" not in spec.guest_json(frontend="toml")
    assert spec.digest() == parse_spec({"name": "a"}, source="mvm.toml").digest()  # the key holds it resolved
    with pytest.raises(SpecError, match="arch"):
        parse_spec({"name": "a", "arch": "arm64"}, source="mvm.toml")
    assert arches.resolve(None) == HOST and arches.resolve("aarch64") == "aarch64"


def test_arch_flag_for_a_flake_picks_its_system(tmp_path: Path) -> None:
    from mvm._api.build import build_image

    layout = Layout(state=tmp_path / "s", cache=tmp_path / "c")
    with pytest.raises(UsageError, match="--arch picks"):
        build_image(flake=".#hello", arch="aarch64", layout=layout)
    with pytest.raises(UsageError, match="mvm builds x86_64 and aarch64"):
        build_image(arch="riscv64", layout=layout)


# -- Nix ----------------------------------------------------------------------------------------


class SystemsNix:
    """A Runner standing in for nix: the flake has only ``packages.aarch64-linux.default``."""

    def __init__(self, out: Path, systems: list[str], broken: tuple[str, ...] = ()) -> None:
        self.out, self.systems, self.calls = out, systems, []  # type: list[list[str]]
        self.broken = broken  #: systems whose default fails to evaluate (a typo in the flake)

    def run(self, argv: Sequence[str | os.PathLike[str]], *, desc: str, on_line: Callable[[str], None] | None = None,
            error: type[Any] = BuildError, env: Mapping[str, str] | None = None, **kw: Any) -> Completed:
        args = [os.fspath(a) for a in argv]
        self.calls.append(args)
        if "--apply" in args:
            return Completed(args, 0, json.dumps(self.systems))
        installable = next(a for a in args if "#" in a)
        wanted = installable.split("#")[1].split(".")[1]
        if wanted not in self.systems or wanted in self.broken:
            text = (f"error: flake 'path:/f' does not provide attribute '{installable.split('#')[1]}'"
                    if wanted not in self.systems else "error: attribute 'pyhton3' missing")
            if on_line:
                on_line(text)
            raise error("nix failed", argv=args, returncode=1, output=text)
        return Completed(args, 0, str(self.out) if args[3] == "eval" else "")

    def spawn(self, argv: Sequence[str], *, stdout: IO[bytes] | int, **kw: Any) -> Any:
        raise NotImplementedError


def _arm_output(root: Path) -> Path:
    out = root / "out"
    out.mkdir()
    (out / "Image").write_bytes(b"MZ" + b"\0" * 0x36 + b"ARMd" + b"\0" * 64)
    (out / "initrd").write_bytes(b"070701")
    (out / "rootfs.ext4").write_bytes(b"\0" * 1024)
    guest = GuestSpec(name="hello", services={"hello": Service(command="true")}).guest_json(
        frontend="nix", extra={"path": "/usr/bin:/bin", "packages": []})
    (out / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "name": "hello", "frontend": "nix", "kernel": "Image", "initrd": "initrd",
        "rootfs": "rootfs.ext4", "kernel_version": "6.12", "guest": guest}))
    return out


def test_a_flake_for_the_other_system_only_builds_that(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed guide's flake (aarch64-linux only) on an x86_64 host: its own system, not an error."""
    monkeypatch.setattr(nix, "require_tool", lambda name: "/usr/bin/nix")
    runner = SystemsNix(_arm_output(tmp_path), ["aarch64-linux"])
    layout = Layout(state=tmp_path / "s", cache=tmp_path / "c")
    image, built = nix.build(".", layout=layout, runner=runner)  # type: ignore[arg-type]
    assert built and image.manifest.arch == "aarch64" and image.manifest.source["attr"] == \
        "packages.aarch64-linux.default"
    with pytest.raises(SpecError, match="has no output packages.x86_64-linux.default"):  # named: no fallback
        nix.build(".#packages.x86_64-linux.default", layout=layout, runner=runner)  # type: ignore[arg-type]
    neither = SystemsNix(tmp_path, ["riscv64-linux"])
    with pytest.raises(SpecError, match="has no output"):
        nix.build(".", layout=layout, runner=neither)  # type: ignore[arg-type]
    # both systems, this host's with a typo: its error, not a silent emulated build of the other
    both = SystemsNix(tmp_path, ["x86_64-linux", "aarch64-linux"], broken=("x86_64-linux",))
    with pytest.raises(SpecError, match="pyhton3"):
        nix.build(".", layout=layout, runner=both)  # type: ignore[arg-type]
    assert not any("aarch64-linux" in " ".join(c) for c in both.calls)


WRONG_SYSTEM = ("error: a 'aarch64-linux' with features {} is required to build "
                "'/nix/store/3k0v4rj5pxjs3d2n0iwzzqn6ia6kl8n5-mvm-hello.drv', but I am a 'x86_64-linux' "
                "with features {benchmark, big-parallel, kvm, nixos-test}")
#: nix 2.8 with extra-platforms but no binfmt handler (wire bytes around the builder's words)
NO_BINFMT = ("\x05\x00\x00\x00\x00\x00\x00\x00Error\x00executing '/nix/store/"
             "a3y1v1bn0n6j1p2lq1r0d8b5d7fd2zk9-bbdir/busybox': Exec format error\n"
             "error: builder for '/nix/store/3k0v4rj5pxjs3d2n0iwzzqn6ia6kl8n5-mvm-hello.drv' failed with exit code 1")


@pytest.mark.parametrize("registered", [False, True])
def test_nix_that_cannot_build_the_system_gives_both_fixes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           registered: bool) -> None:
    monkeypatch.setattr(arches, "binfmt_enabled", lambda arch: registered and arch == "aarch64")
    monkeypatch.setattr(arches, "BINFMT_D", tmp_path)  # Debian 12's way: update-binfmts
    monkeypatch.setattr(arches, "BINFMT", tmp_path)  # no handler registered, enabled or not
    err = nixerrors.condense(WRONG_SYSTEM, flake=".", attr="packages.aarch64-linux.default", system="x86_64-linux")
    assert err.message == "this machine (x86_64-linux) cannot build for aarch64-linux"
    hint = err.hint or ""
    assert 'set `system = "x86_64-linux";`' in hint and "\n    extra-platforms = aarch64-linux\n" in hint
    # only the steps still to do: mvm's arm64 Debian builds may have registered the handler already
    assert ("update-binfmts --enable qemu-aarch64" in hint) is not registered
    assert ("handler is registered already" in hint) is registered
    assert len(hint.splitlines()) <= 4
    err = nixerrors.condense(NO_BINFMT, flake=".", attr="packages.aarch64-linux.default", system="x86_64-linux")
    assert err.message == "nix could not run a build program for aarch64-linux here (busybox: Exec format error)"
    assert "update-binfmts --enable qemu-aarch64" in (err.hint or "") and "extra-platforms" not in (err.hint or "")
    unnamed = nixerrors.condense(NO_BINFMT, flake=".", attr="hello", system="x86_64-linux")
    assert "another architecture here" in unnamed.message and "a another" not in (unnamed.hint or "")
    assert "qemu-user-static binfmt-support" in (unnamed.hint or "")
    darwin = nixerrors.condense(WRONG_SYSTEM.replace("aarch64-linux", "aarch64-darwin"), flake=".",
                                attr="packages.aarch64-darwin.default", system="x86_64-linux")
    assert "remote builders" in (darwin.hint or "")


# -- orchestration ------------------------------------------------------------------------------


def test_up_records_the_architecture_and_the_emulation(tmp_path: Path) -> None:
    import mvm
    from mvm import backends
    from mvm.backends.fake import FakeBackend
    from mvm.builders.store import Image, Manifest

    path = tmp_path / "image"
    path.mkdir()
    for name in ("Image", "initrd", "rootfs.ext4"):
        (path / name).write_bytes(b"x")
    image = Image(path, Manifest(key="a" * 32, name="web", frontend="toml", source={"path": "/x/mvm.toml"},
                                 kernel="Image", arch="aarch64", guest=GuestSpec(name="web")))
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    fake = FakeBackend()
    backends.register("fake", lambda runner: fake)
    vm = mvm.up(image=image, layout=layout, backend=fake, boot_timeout=5)
    try:
        info = vm.info()
        assert info.arch == "aarch64" and info.emulated == "aarch64 guest emulated (fake)"
        machine = next(iter(fake.machines.values()))
        assert machine.spec.arch == "aarch64" and machine.spec.kernel == path / "Image"
    finally:
        vm.down()
        backends.unregister("fake")
    assert mvm.ls(layout=layout) == []


# -- an aarch64 host (Graviton, Ampere, a Raspberry Pi 5): nothing here can run, so the choices ----


def test_on_an_aarch64_host_the_roles_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.setattr(arches, "BINFMT", tmp_path)
    x86 = accel.choose("auto", tmp_path / "vmlinux", None, tmp_path, arch="x86_64")
    assert x86.accel == "tcg" and (x86.emulated or "").startswith("x86_64 guest on an aarch64 host")
    native = accel.choose("tcg", tmp_path / "Image", None, tmp_path, arch="aarch64")
    assert native.emulated is None
    monkeypatch.setattr("os.path.exists", lambda path: False)
    assert accel.choose("auto", tmp_path / "Image", None, tmp_path, arch="aarch64") == \
        accel.Preflight("tcg", "TCG: /dev/kvm does not exist")  # the native path: the KVM checks, as on x86
    assert arches.resolve(None) == "aarch64" and not arches.foreign("aarch64") and arches.foreign("x86_64")
    assert "qemu-x86_64 is not registered" in (arches.emulation_problem("x86_64") or "")
    assert "dpkg --add-architecture amd64" in arches.setup_fix("x86_64")
    err = nixerrors.condense(WRONG_SYSTEM.replace("'aarch64-linux'", "'x86_64-linux'", 1).replace(
        "I am a 'x86_64-linux'", "I am a 'aarch64-linux'"), flake=".", attr="packages.x86_64-linux.default",
        system="aarch64-linux")
    assert err.message == "this machine (aarch64-linux) cannot build for x86_64-linux"
    assert "extra-platforms = x86_64-linux" in (err.hint or "") and "qemu-x86_64" in (err.hint or "")


def test_kvm_for_a_foreign_guest_is_refused_before_the_build(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --arch aarch64 --hypervisor qemu-kvm` rebuilt the arm64 package layer (minutes under
    qemu-user) and only then said KVM cannot run it; a spec that says so, the same."""
    import mvm
    from mvm._api import up as up_api
    from mvm.names import host_arch

    other = "aarch64" if host_arch() == "x86_64" else "x86_64"

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("built before refusing")

    monkeypatch.setattr(up_api, "build_image", no_build)
    layout = Layout(state=tmp_path / "s", cache=tmp_path / "c")
    (tmp_path / "mvm.toml").write_text('name = "web"\n[services.web]\ncommand = "true"\n')
    with pytest.raises(mvm.UsageError, match=f"KVM cannot run an {other} guest"):
        mvm.up(str(tmp_path), arch=other, hypervisor="qemu-kvm", layout=layout)
    (tmp_path / "mvm.toml").write_text(f'name = "web"\narch = "{other}"\n[services.web]\ncommand = "true"\n')
    with pytest.raises(mvm.UsageError, match=f"KVM cannot run an {other} guest"):
        mvm.up(str(tmp_path), hypervisor="qemu-kvm", layout=layout)
