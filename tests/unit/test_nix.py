"""The Nix front end's host side, without Nix: error condensing, arguments, import."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from mvm._proc import Completed
from mvm.builders import nix, nixerrors
from mvm.cli.options import join_override_pairs, nix_args
from mvm.errors import BuildError, SpecError, ToolMissing, UsageError
from mvm.paths import Layout
from mvm.spec import GuestSpec, HealthCheck, Service, parse_spec

ROOT = Path(__file__).parents[2]
STORE = "/nix/store/yz4nxgv09zagbf5aaw83mm9b1k8v3gkx-source"

# Verbatim nix 2.8 output for the seed guide's troubleshooting cases (plus a few more).
TYPO = f"""warning: Git tree '/src' is dirty
error: attribute 'pyhton3' missing

       at {STORE}/flake.nix:13:22:

           12|         name = "hello";
           13|         packages = [ pkgs.pyhton3 pkgs.curl ];
             |                      ^
           14|         services.hello = {{
       Did you mean python3?
"""
MISSING_PATH = f"""error: getting status of '{STORE}/app': No such file or directory
(use '--show-trace' to show detailed location information)
"""
RECURSION = f"""error: infinite recursion encountered

       at {STORE}/flake.nix:9:54:

            8|       system = "x86_64-linux";
            9|       pkgs = import nixpkgs {{ inherit system; }}; a = b; b = a; x = a;
             |                                                      ^
           10|     in {{
(use '--show-trace' to show detailed location information)
"""
MKGUEST = "error: mkGuest: healthChecks.hello.healthIntervalSec: unknown attribute " \
          "(did you mean 'healthIntervalSecs'?)\n"
NO_OUTPUT = "error: flake 'path:/tmp/seed' does not provide attribute " \
            "'packages.x86_64-linux.packages.x86_64-linux.default.outPath', " \
            "'legacyPackages.x86_64-linux.packages.x86_64-linux.default.outPath' or " \
            "'packages.x86_64-linux.default.outPath'\n"
WRONG_SYSTEM = "error: a 'aarch64-linux' with features {} is required to build " \
               "'/nix/store/vpb9cgrgh7bx7sfk7bdknhxpqy7fyad1-linux-6.1.drv', but I am a " \
               "'x86_64-linux' with features {benchmark, big-parallel, kvm, nixos-test}\n"
BUILDER = """building '/nix/store/fby0ahfy8xixadyznn1m3jl46izqyd30-mvm-hello-rootfs.drv'...
mvm-hello-rootfs> mkfs.ext4: No space left on device
error: builder for '/nix/store/fby0ahfy8xixadyznn1m3jl46izqyd30-mvm-hello-rootfs.drv' failed with exit code 1
"""
#: the same two failures in newer nix's words (DerivationBuildingGoal, colours as on a terminal)
WRONG_SYSTEM_NEW = ("error: Cannot build "
                    "'\x1b[35;1m/nix/store/vpb9cgrgh7bx7sfk7bdknhxpqy7fyad1-linux-6.1.drv\x1b[0m'.\n"
                    "       Reason: \x1b[31;1mrequired system or feature not available\x1b[0m\n"
                    "       Required system: 'aarch64-linux' with features {}\n"
                    "       Current system: 'x86_64-linux' with features {benchmark, big-parallel, kvm, nixos-test}\n")
BUILDER_NEW = """mvm-hello-rootfs> mkfs.ext4: No space left on device
error: Cannot build '/nix/store/fby0ahfy8xixadyznn1m3jl46izqyd30-mvm-hello-rootfs.drv'.
       Reason: builder failed with exit code 1.
       Output paths:
         /nix/store/0m5lrxw0q7nbq4yqnmhlx4v3mm0xhk0y-mvm-hello-rootfs
"""
OFFLINE = "error: unable to download 'https://github.com/NixOS/nixpkgs/archive/x.tar.gz': " \
          "Couldn't resolve host name (6)\n"


def _condense(output: str) -> Any:
    return nixerrors.condense(output, flake="/tmp/seed", attr="packages.x86_64-linux.default",
                              system="x86_64-linux", returncode=1)


def test_typo_in_a_package_name() -> None:
    err = _condense(TYPO)
    assert isinstance(err, SpecError)
    assert err.message == "flake.nix:13:22: attribute 'pyhton3' does not exist"
    assert err.hint.startswith("did you mean 'python3'?")
    assert "search.nixos.org" in err.hint
    assert err.output.splitlines()[1] == "13|         packages = [ pkgs.pyhton3 pkgs.curl ];"


def test_missing_path_is_shown_relative_to_the_flake() -> None:
    err = _condense(MISSING_PATH)
    assert err.message == "the flake refers to a path that does not exist: ./app"
    assert "git add" in err.hint


def test_infinite_recursion() -> None:
    err = _condense(RECURSION)
    assert err.message == "flake.nix:9:54: infinite recursion"
    assert "refers to its own name" in err.hint


def test_mkguest_errors_pass_through() -> None:
    err = _condense(MKGUEST)
    assert isinstance(err, SpecError)
    assert err.message == ("mkGuest: healthChecks.hello.healthIntervalSec: unknown attribute "
                           "(did you mean 'healthIntervalSecs'?)")


def test_missing_default_output_suggests_the_system() -> None:
    err = _condense(NO_OUTPUT)
    assert err.message == "the flake /tmp/seed has no output packages.x86_64-linux.default"
    assert 'system = "x86_64-linux";' in err.hint


def test_wrong_system_and_offline_and_builder_failures() -> None:
    assert _condense(WRONG_SYSTEM).message == "this machine (x86_64-linux) cannot build for aarch64-linux"
    offline = _condense(OFFLINE)
    assert isinstance(offline, BuildError) and "--override-input" in (offline.hint or "")
    built = _condense(BUILDER)
    assert built.message == "nix could not build mvm-hello-rootfs with exit code 1"
    assert "No space left on device" in built.output
    new = _condense(WRONG_SYSTEM_NEW)
    assert new.message == "this machine (x86_64-linux) cannot build for aarch64-linux" and "extra-platforms" in new.hint
    built = _condense(BUILDER_NEW)
    assert built.message == "nix could not build mvm-hello-rootfs: builder failed with exit code 1"
    assert "No space left on device" in built.output


def test_unknown_errors_keep_nix_words_and_no_error_at_all() -> None:
    err = _condense("error: something new\n       and its detail\n")
    assert err.message == "something new" and err.output == "and its detail"
    none = _condense("segfault\n")
    assert isinstance(none, BuildError) and "exit code 1" in none.message


def test_ansi_colours_are_ignored() -> None:
    err = _condense("\x1b[31;1merror:\x1b[0m attribute '\x1b[35;1mfoo\x1b[0m' missing\n")
    assert err.message == "attribute 'foo' does not exist"


@pytest.mark.parametrize(
    ("argv", "joined"),
    [
        (["build", "--override-input", "mvm", "path:/x", "--json"],
         ["build", "--override-input", "mvm=path:/x", "--json"]),
        (["--override-input", "mvm", "git+file:///r?dir=nix"], ["--override-input", "mvm=git+file:///r?dir=nix"]),
        (["--override-input", "a=b"], ["--override-input", "a=b"]),
        (["exec", "x", "--", "--override-input", "a", "b"], ["exec", "x", "--", "--override-input", "a", "b"]),
        (["--override-input", "a"], ["--override-input", "a"]),
    ],
)
def test_override_pairs_are_joined_before_parsing(argv: list[str], joined: list[str]) -> None:
    assert join_override_pairs(argv) == joined


def test_nix_args() -> None:
    assert nix_args(["mvm=git+file:///r?dir=nix"], ["--show-trace"]) == [
        "--override-input", "mvm", "git+file:///r?dir=nix", "--show-trace"]
    with pytest.raises(UsageError, match="expected NAME URL"):
        nix_args(["mvm"], None)


def test_flake_refs() -> None:
    assert nix.parse_ref(".", "x86_64-linux").installable == ".#packages.x86_64-linux.default"
    assert nix.parse_ref("github:me/app#guest", "x86_64-linux").installable == "github:me/app#guest"
    assert nix.parse_ref("#x", "aarch64-linux").installable == ".#x"
    with pytest.raises(UsageError):
        nix.parse_ref(" ")


def test_a_local_flake_that_is_not_one_is_said_before_nix_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--flake t1` (a directory here) had nix look "t1" up in its registry online and say
    "check the network"; `--flake ./nosuch` got a hint about paths relative to flake.nix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "flake.nix").write_text("{}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="nix takes a bare word for a name in its flake registry") as bare:
        nix.check_local("t1")
    assert bare.value.hint == "write it as a path: --flake ./t1"
    with pytest.raises(UsageError, match="nosuch does not exist"):
        nix.check_local("./nosuch")
    with pytest.raises(UsageError, match="empty has no flake.nix"):
        nix.check_local("./empty")
    (tmp_path / "t1" / "src").mkdir()
    (tmp_path / "t1" / ".git").mkdir()
    (tmp_path / "empty" / ".git").mkdir()
    with pytest.raises(UsageError, match="empty has no flake.nix"):  # above its git top: not looked at
        nix.check_local("./empty")
    for fine in ("./t1", str(tmp_path / "t1"), "nixpkgs", "github:me/app", "./t1?dir=x", "./t1/src", "."):
        if fine == ".":  # in a subdirectory of a flake's repository: nix finds the flake above it
            monkeypatch.chdir(tmp_path / "t1" / "src")
        nix.check_local(fine)


class FakeNix:
    """A Runner that answers `nix eval` with a path and records `nix build`."""

    def __init__(self, out: Path, fail: str | None = None) -> None:
        self.out = out
        self.fail = fail
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str | os.PathLike[str]], *, desc: str, env: Mapping[str, str] | None = None,
            cwd: Path | None = None, input: bytes | None = None, timeout: float | None = None,
            on_line: Callable[[str], None] | None = None, error: type[Any] = BuildError,
            hint: str | None = None, ok_codes: Sequence[int] = (0,)) -> Completed:
        args = [os.fspath(a) for a in argv]
        self.calls.append(args)
        assert args[1:3] == ["--extra-experimental-features", "nix-command flakes"]
        if self.fail:
            for line in self.fail.splitlines():
                if on_line:
                    on_line(line)
            raise error("nix failed", argv=args, returncode=1, output=self.fail[-100:])
        text = f"warning: Git tree is dirty\n{self.out}" if args[3] == "eval" else "building...\n"
        return Completed(args, 0, text)

    def spawn(self, argv: Sequence[str | os.PathLike[str]], *, stdout: IO[bytes] | int,
              cwd: Path | None = None, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        raise NotImplementedError


def _nix_output(root: Path, **manifest: Any) -> Path:
    out = root / "out"
    out.mkdir()
    (out / "vmlinux").write_bytes(b"\x7fELF")
    (out / "initrd").write_bytes(b"070701")
    (out / "rootfs.ext4").write_bytes(b"\0" * 1024)
    guest = GuestSpec(name="hello", services={"hello": Service(command="true")},
                      health_checks={"hello": HealthCheck(health_cmd="true")}).guest_json(
        frontend="nix", extra={"path": "/usr/bin:/bin", "packages": ["python3-3.11"]})
    doc = {"schema_version": 1, "name": "hello", "frontend": "nix", "kernel": "vmlinux", "initrd": "initrd",
           "rootfs": "rootfs.ext4", "kernel_version": "6.1", "guest": guest, **manifest}
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


@pytest.fixture()
def with_nix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nix, "require_tool", lambda name: "/usr/bin/nix")


def test_build_imports_then_hits_the_cache(tmp_path: Path, with_nix: None) -> None:
    out = _nix_output(tmp_path)
    runner = FakeNix(out)
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    image, built = nix.build("/src/app#hello", nix_args=["--override-input", "a", "b"], layout=layout, runner=runner)
    assert built and [c[3] for c in runner.calls] == ["eval", "build"]
    assert runner.calls[0][-3:] == ["--override-input", "a", "b"]
    assert runner.calls[0][4:6] == ["--raw", "/src/app#hello.outPath"]
    assert image.manifest.frontend == "nix" and image.manifest.source["out_path"] == str(out)
    assert image.manifest.key == nix.image_key(str(out))
    assert image.rootfs.is_file() and not image.rootfs.is_symlink()
    assert image.manifest.guest.name == "hello" and "hello" in image.manifest.guest.health_checks
    runner.calls.clear()
    again, built = nix.build("/src/app#hello", layout=layout, runner=runner)
    assert not built and again.path == image.path
    assert [c[3] for c in runner.calls] == ["eval"]  # a cache hit costs one evaluation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 2}, "manifest schema 2"),
        ({"frontend": "toml"}, "is not an mvm image"),
        ({"rootfs": "missing.ext4"}, "the image has no rootfs file"),
        ({"guest": {"name": "Bad Name"}}, "the guest in the image is invalid: name: 'Bad Name' is not a valid"),
        ({"guest": {"name": "x", "cpus": "2"}},
         "the guest in the image is invalid: cpus: must be a whole number, not str '2'"),
    ],
)
def test_outputs_that_are_not_usable_images(tmp_path: Path, with_nix: None, change: dict[str, Any],
                                            message: str) -> None:
    out = _nix_output(tmp_path, **change)
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    with pytest.raises((SpecError, BuildError), match=re.escape(message)):
        nix.build(".", layout=layout, runner=FakeNix(out))
    assert not list((tmp_path / "cache" / "images").glob("*/manifest.json"))


def test_nix_errors_are_condensed_from_the_whole_output(tmp_path: Path, with_nix: None) -> None:
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    noisy = TYPO + "".join(f"       … while evaluating frame {i}\n" for i in range(60))
    with pytest.raises(SpecError, match="attribute 'pyhton3' does not exist"):
        nix.build(".", layout=layout, runner=FakeNix(tmp_path, fail=noisy))


def test_no_nix_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda *a, **k: None)
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    with pytest.raises(ToolMissing) as info:
        nix.build(".", layout=layout, runner=FakeNix(tmp_path))
    assert "mvmctl dev" in (info.value.hint or "") and "nix" in (info.value.hint or "")


def _nix_list(name: str) -> list[str]:
    text = (ROOT / "nix" / "spec.nix").read_text()
    block = re.search(rf"{name} = \[(.*?)\];", text, re.S)
    assert block, name
    return re.findall(r'"([^"]+)"', block[1])


def test_mkguest_accepts_the_same_attributes_as_the_python_model() -> None:
    def aliases(model: Any) -> set[str]:
        return {f.alias or n for n, f in model.model_fields.items()}

    # `arch` is mvm.toml's: a flake's architecture is its `system`.
    assert set(_nix_list("topKeys")) == (aliases(GuestSpec) - {"arch"}) | {"kernel"}
    assert set(_nix_list("serviceKeys")) == aliases(Service)
    assert set(_nix_list("checkKeys")) == aliases(HealthCheck)
    assert set(_nix_list("restartPolicies")) == {"always", "on-failure", "no"}


def test_mkguest_refuses_a_dependency_loop_as_mvm_toml_does() -> None:
    """Evaluated by the real nix (nix-bin): the loop is named before anything is built."""
    nix_args = ('{ name = "x"; services.a = { command = "x"; dependsOn = [ "b" ]; }; '
                'services.b = { command = "y"; dependsOn = [ "c" ]; }; '
                'services.c = { command = "z"; dependsOn = [ "b" ]; }; }')
    expr = f"(import {ROOT / 'nix' / 'spec.nix'}) {nix_args}"
    r = subprocess.run(["nix-instantiate", "--eval", "--strict", "-E", expr], capture_output=True, text=True)
    services = {"a": {"command": "x", "dependsOn": ["b"]}, "b": {"command": "y", "dependsOn": ["c"]},
                "c": {"command": "z", "dependsOn": ["b"]}}
    with pytest.raises(SpecError) as python:
        parse_spec({"name": "x", "services": services}, source="t")
    loop = ("services depend on each other in a loop (b -> c -> b), so none of them would ever start: "
            "remove one dependsOn")
    assert r.returncode != 0 and f"mkGuest: services: {loop}" in r.stderr
    assert python.value.message == f"t: {loop}"


@pytest.mark.parametrize("hostname", ["web\n10.0.0.1 bank.example", "a b", "-web", "x" * 254])
def test_a_hostname_that_would_add_hosts_is_refused_by_both_front_ends(hostname: str) -> None:
    """The hostname goes into the guest's /etc/hosts: a line break there adds a host."""
    expr = f"(import {ROOT / 'nix' / 'spec.nix'}) {{ name = \"x\"; hostname = {json.dumps(hostname)}; }}"
    r = subprocess.run(["nix-instantiate", "--eval", "--strict", "-E", expr], capture_output=True, text=True)
    assert r.returncode != 0 and "mkGuest: hostname:" in r.stderr, r.stderr
    with pytest.raises(SpecError, match="hostname"):
        parse_spec({"name": "x", "hostname": hostname}, source="t")
    ok = f"(import {ROOT / 'nix' / 'spec.nix'}) {{ name = \"x\"; hostname = \"web-1.internal\"; }}"
    good = subprocess.run(["nix-instantiate", "--eval", "--strict", "-E", ok], capture_output=True, text=True)
    assert good.returncode == 0 and "web-1.internal" in good.stdout, good.stderr
    assert parse_spec({"name": "x", "hostname": "web-1.internal"}, source="t").hostname == "web-1.internal"


def test_the_flake_sees_every_file_it_needs() -> None:
    """Flakes read only files git tracks: an untracked file under nix/ would build here
    from a path: copy and fail for users of github:...?dir=nix."""
    try:
        untracked = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "nix", "src/mvm/guest", "src/mvm/builders/initrd.py",
             "src/mvm/builders/vmlinux.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert not untracked, f"git add {' '.join(untracked)}"


def test_dev_shell_environment() -> None:
    from mvm._api import dev

    env = dev.host_env({"NIX_CONFIG": "substituters =", "HOME": "/h"}, root_without_build_users=True)
    assert env["NIX_CONFIG"].splitlines() == [
        "substituters =", "extra-experimental-features = nix-command flakes", "build-users-group ="]
    assert env["HOME"] == "/h" and env["MVM_DEV"] == "host"
    plain = dev.host_env({}, root_without_build_users=False)
    assert plain["NIX_CONFIG"] == "extra-experimental-features = nix-command flakes"


def test_dev_mode_follows_nix_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm._api import dev

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nix")
    assert dev.choose_mode() == "host" and dev.choose_mode(force_vm=True) == "vm"
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert dev.choose_mode() == "vm"


def test_shares_add_virtiofs_devices_and_shared_memory(tmp_path: Path) -> None:
    from mvm.backends.base import LaunchSpec, Share
    from mvm.backends.qemu_argv import build_argv
    from mvm.paths import VMFiles

    from .handoffs import NamingHandoff

    spec = LaunchSpec(name="d", files=VMFiles(tmp_path), kernel=tmp_path / "k", initrd=None,
                      rootfs=tmp_path / "r", cpus=1, memory=768, accel="tcg",
                      shares=[Share("mvm-project", tmp_path)])
    argv = build_argv(spec, NamingHandoff(), "qemu")
    assert argv[argv.index("-M") + 1].endswith(",memory-backend=mem")
    assert "memory-backend-memfd,id=mem,size=768M,share=on" in argv
    assert "vhost-user-fs-pci,chardev=fs0,tag=mvm-project" in argv
    plain = build_argv(LaunchSpec(name="d", files=VMFiles(tmp_path), kernel=tmp_path / "k", initrd=None,
                                  rootfs=tmp_path / "r", cpus=1, memory=768, accel="tcg"), NamingHandoff(), "qemu")
    assert not any("memory-backend" in a for a in plain)


def test_build_users_error_has_a_hint() -> None:
    err = _condense("error: the group 'nixbld' specified in 'build-users-group' does not exist\n")
    assert "build-users-group =" in (err.hint or "")


# --- the kernel QEMU boots: builders/vmlinux.py ----------------------------------------------

def _elf(*notes: tuple[bytes, int, bytes]) -> bytes:
    """A minimal ELF64 (x86_64) whose one PT_NOTE segment holds ``notes`` (name, type, desc)."""
    import struct

    blob = b""
    for name, kind, desc in notes:
        name += b"\0"
        blob += struct.pack("<III", len(name), len(desc), kind)
        blob += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56, 0, 0, len(blob), len(blob), 4)
    return bytes(header) + phdr + blob + b"kernel text" * 100


PVH_ELF = _elf((b"GNU", 3, b"\x01" * 20), (b"Xen", 18, (0x1000850).to_bytes(4, "little")))
PLAIN_ELF = _elf((b"GNU", 3, b"\x01" * 20), (b"Xen", 5, b"xen-3.0\0"))


def _bzimage(elf: bytes, fmt: str) -> bytes:
    """An x86 bzImage around ``elf``, compressed as the kernel's build does (size appended)."""
    import bz2
    import gzip
    import lzma
    import struct

    if fmt == "gzip":
        payload = gzip.compress(elf)
    else:
        body = {"xz": lambda: lzma.compress(elf, check=lzma.CHECK_CRC32), "bzip2": lambda: bz2.compress(elf),
                "zstd": lambda: subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True,
                                               check=True).stdout}[fmt]()
        payload = body + struct.pack("<I", len(elf))
    setup = bytearray(1024)  # boot sector + one setup sector
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + b"\0" * 16 + payload + b"\0" * 100


@pytest.mark.parametrize("fmt", ["gzip", "xz", "bzip2", "zstd"])
def test_vmlinux_is_extracted_from_each_payload_format(fmt: str) -> None:
    from mvm.builders import vmlinux

    if fmt == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd is not installed")
    elf = vmlinux.extract(_bzimage(PVH_ELF, fmt))
    assert elf == PVH_ELF
    assert vmlinux.pvh_entry(elf) == 0x1000850
    assert vmlinux.pvh_entry(PLAIN_ELF) is None


def test_vmlinux_rejects_what_it_cannot_boot() -> None:
    from mvm.builders import vmlinux

    with pytest.raises(vmlinux.KernelFormatError, match="not an x86 bzImage"):
        vmlinux.extract(b"MZ" + b"\0" * 4096)
    damaged = bytearray(_bzimage(PVH_ELF, "xz"))
    damaged[1040:1060] = b"\0" * 20
    with pytest.raises(vmlinux.KernelFormatError, match="compression|does not decompress"):
        vmlinux.extract(bytes(damaged))
    short = _bzimage(PVH_ELF, "xz")[:1100]
    with pytest.raises(vmlinux.KernelFormatError, match="truncated"):
        vmlinux.extract(short)


def _choose(tmp_path: Path, name: str, data: bytes) -> tuple[dict[str, Any], Path]:
    from mvm.builders import vmlinux

    src = tmp_path / "kernel" / name
    src.parent.mkdir()
    src.write_bytes(data)
    out = tmp_path / "out"
    report = vmlinux.choose(str(src), str(out))
    assert json.loads((out / "kernel.json").read_text()) == report
    return report, out


def test_mkguest_boots_the_pvh_vmlinux_inside_a_bzimage(tmp_path: Path) -> None:
    report, out = _choose(tmp_path, "bzImage", _bzimage(PVH_ELF, "xz"))
    assert report == {"kernel": "vmlinux", "boot": "pvh", "kernel_note": None}
    assert (out / "vmlinux").read_bytes() == PVH_ELF and not (out / "vmlinux").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["kernel.json", "vmlinux"]


def test_mkguest_falls_back_to_the_bzimage_without_a_pvh_note(tmp_path: Path) -> None:
    report, out = _choose(tmp_path, "bzImage", _bzimage(PLAIN_ELF, "gzip"))
    assert report["kernel"] == "bzImage" and report["boot"] == "bzimage"
    assert "no PVH ELF note" in str(report["kernel_note"])
    assert (out / "bzImage").is_symlink() and (out / "bzImage").resolve() == tmp_path / "kernel" / "bzImage"
    damaged = bytearray(_bzimage(PVH_ELF, "xz"))
    damaged[1040:1060] = b"\0" * 20
    (tmp_path / "damaged").mkdir()
    report, out = _choose(tmp_path / "damaged", "bzImage", bytes(damaged))
    assert report["boot"] == "bzimage" and "no vmlinux could be extracted" in str(report["kernel_note"])


def test_other_kernels_are_booted_as_built(tmp_path: Path) -> None:
    """An aarch64 `Image` is not touched; an ELF with the note is used as it is."""
    image = b"\0" * 0x38 + b"ARM\x64" + b"\0" * 4096
    report, out = _choose(tmp_path, "Image", image)
    assert report == {"kernel": "Image", "boot": "image", "kernel_note": None}
    assert (out / "Image").is_symlink()
    (tmp_path / "elf").mkdir()
    report, out = _choose(tmp_path / "elf", "vmlinux", PVH_ELF)
    assert report == {"kernel": "vmlinux", "boot": "pvh", "kernel_note": None}
    assert (out / "vmlinux").is_symlink()
    (tmp_path / "plain").mkdir()
    report, out = _choose(tmp_path / "plain", "vmlinux", PLAIN_ELF)
    assert report["boot"] == "elf" and "QEMU cannot boot it" in str(report["kernel_note"])


def test_vmlinux_py_runs_as_a_bare_script(tmp_path: Path) -> None:
    """mkGuest runs it with nixpkgs' python3, outside mvm: stdlib imports only."""
    import ast
    import sys

    path = ROOT / "src" / "mvm" / "builders" / "vmlinux.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module or "").split(".")[0] in sys.stdlib_module_names | {"__future__"}
        elif isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in sys.stdlib_module_names for a in node.names)
    (tmp_path / "bzImage").write_bytes(_bzimage(PVH_ELF, "xz"))
    r = subprocess.run([sys.executable, "-I", str(path), str(tmp_path / "bzImage"), "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "kernel: vmlinux (boot: pvh)"


def test_debian_kernel_extraction_delegates(tmp_path: Path) -> None:
    from mvm._proc import DEFAULT_RUNNER
    from mvm.builders.kernel import extract_vmlinux

    assert extract_vmlinux(_bzimage(PVH_ELF, "xz"), DEFAULT_RUNNER) == PVH_ELF
    if shutil.which("zstd"):
        assert extract_vmlinux(_bzimage(PVH_ELF, "zstd"), DEFAULT_RUNNER) == PVH_ELF
    with pytest.raises(BuildError, match="cannot unpack the kernel: not an x86 bzImage"):
        extract_vmlinux(b"\0" * 4096, DEFAULT_RUNNER)


def test_the_kernel_note_reaches_the_image_record(tmp_path: Path, with_nix: None) -> None:
    out = _nix_output(tmp_path, kernel_boot="bzimage", kernel_image="bzImage",
                      kernel_note="bzImage: its vmlinux has no PVH ELF note")
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    stages: list[str] = []
    image, _ = nix.build(".", layout=layout, runner=FakeNix(out), on_stage=stages.append)
    assert image.manifest.source["kernel_note"] == "bzImage: its vmlinux has no PVH ELF note"
    assert image.manifest.source["kernel_boot"] == "bzimage"
    assert "note: bzImage: its vmlinux has no PVH ELF note" in stages
