"""``mvmctl export --kubevirt``: an mvm image as a KubeVirt ``VirtualMachine``.

One OCI image carries everything the cluster needs, so one push is enough:
``/boot/vmlinux`` and ``/boot/initrd`` for ``firmware.kernelBoot`` and
``/disk/rootfs.qcow2`` for the ``containerDisk`` root, all owned by uid/gid 107 (the
``qemu`` user virt-launcher runs QEMU as; it must read all three). The same image is named
twice in the VM: KubeVirt pulls it once per node.

The guest boots the same kernel, initrd and init as under ``mvmctl up``, with a command
line that holds nothing from the exporting host (no ``tsc_early_khz``: the TSC rate is the
node's, and KubeVirt runs under KVM, where the calibration hang it avoids does not occur)
and ``mvm.standalone=1``: there is no mvm host, no config disk and no agent channel, so the
guest takes its address by DHCP (KubeVirt's masquerade gives 10.0.2.2, gateway 10.0.2.1),
reads per-boot settings from the command line and writes service logs and health
transitions to the serial console (see ``mvm.guest.init``).

``export`` writes, into an output directory::

    vm.yaml                  VirtualMachine + Service (if there are ports)
    oci/                     the OCI image layout (or, with archive=True, NAME.oci.tar)

and returns the ``skopeo copy`` and ``kubectl apply`` lines to run next.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .._proc import DEFAULT_RUNNER, Runner
from ..errors import CommandFailed, StateError, UsageError
from . import oci
from .documents import (
    DEFAULT_REGISTRY,
    DISK_PATH,
    INITRD_PATH,
    KERNEL_PATH,
    QEMU_UID,
    DroppedCheck,
    HealthCheckInput,
    KubevirtSpec,
    ProbePlan,
    check_env,
    check_name,
    kernel_args,
    parse_image_ref,
    plan_probe,
    pod_labels,
    render_yaml,
    service,
    virtual_machine,
    yaml_header,
)

__all__ = [
    "DroppedCheck",
    "ExportResult",
    "HealthCheckInput",
    "KubevirtSpec",
    "ProbePlan",
    "check_name",
    "export",
    "kernel_args",
    "parse_image_ref",
    "plan_probe",
    "pod_labels",
    "render_yaml",
    "service",
    "spec_from_image",
    "virtual_machine",
]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    vm_yaml: Path
    layout: Path | None  # the OCI layout dir, unless archive=True
    archive: Path | None  # the oci-archive tar, if archive=True
    image: str
    manifest_digest: str
    ports: tuple[int, ...]
    probe_from: str | None
    notes: tuple[str, ...]
    dropped: tuple[DroppedCheck, ...]
    push_argv: tuple[str, ...]
    apply_argv: tuple[str, ...]

    @property
    def commands(self) -> list[str]:
        """The two lines to run next, quoted for a POSIX shell."""
        return [shlex.join(self.push_argv), shlex.join(self.apply_argv)]


# --- input --------------------------------------------------------------------------------


def spec_from_image(
    image_dir: Path,
    *,
    name: str | None = None,
    image: str | None = None,
    ports: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    extra_kernel_args: Sequence[str] = (),
) -> KubevirtSpec:
    """A :class:`KubevirtSpec` for a built image directory (``manifest.json``, kernel,
    initrd, ``rootfs.ext4``), as ``mvmctl build --json`` reports its ``path``.

    ``name`` defaults to the image's name, as ``up --name`` does; when it differs and the
    spec sets no hostname, it becomes the guest's hostname, also as under ``up``.
    """
    from ..builders.store import read_manifest

    manifest = read_manifest(image_dir)  # StateError, with a hint, if it is not an image
    guest = manifest.guest
    image_name = manifest.name
    kernel = image_dir / manifest.kernel
    initrd_name = manifest.initrd
    rootfs = image_dir / manifest.rootfs
    checks = tuple(
        HealthCheckInput(name=check_name_, cmd=check.health_cmd, interval_secs=check.health_interval_secs,
                         timeout_secs=check.health_timeout_secs)
        for check_name_, check in sorted(guest.health_checks.items())
    )
    cpus, memory = guest.cpus, guest.memory
    if manifest.arch != "x86_64":
        raise UsageError(f"{image_name} is an {manifest.arch} image; the KubeVirt export writes x86_64 (amd64) "
                         "images only",
                         hint="export an x86_64 build of the guest: mvmctl export SPEC_DIR --arch x86_64 "
                         "builds one from the spec (or --flake REF --arch x86_64)")
    vm_name = name or image_name
    hostname = vm_name if vm_name != image_name and not guest.hostname else None
    return KubevirtSpec(
        name=vm_name,
        kernel=kernel,
        initrd=image_dir / initrd_name if initrd_name else None,
        rootfs=rootfs,
        cpus=cpus,
        memory_mib=memory,
        ports=tuple(ports),
        health_checks=checks,
        image=image,
        hostname=hostname,
        env=dict(env or {}),
        extra_kernel_args=tuple(extra_kernel_args),
    )


# --- export -------------------------------------------------------------------------------


def _convert_rootfs(runner: Runner, rootfs: Path, dest: Path) -> None:
    runner.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", rootfs, dest],
        desc="convert the root filesystem to qcow2",
        error=CommandFailed,
        hint="check that the image's rootfs.ext4 is readable and that there is free space",
    )


def _layer_files(spec: KubevirtSpec, qcow2: Path) -> list[oci.LayerFile]:
    files = [oci.LayerFile(KERNEL_PATH[1:], spec.kernel, 0o444, QEMU_UID, QEMU_UID)]
    if spec.initrd is not None:
        files.append(oci.LayerFile(INITRD_PATH[1:], spec.initrd, 0o444, QEMU_UID, QEMU_UID))
    files.append(oci.LayerFile(DISK_PATH[1:], qcow2, 0o440, QEMU_UID, QEMU_UID))
    return files


def check_inputs(out_dir: Path, *, name: str | None, image: str | None, ports: Sequence[int | str],
                 env: Mapping[str, str], force: bool) -> list[int]:
    """What the caller gave, checked before anything slow (a build, the conversion) runs;
    returns the ports as numbers (the API takes ``8080`` or ``"8080"``, as ``up`` does)."""
    if name is not None:
        check_name(name)
    if image is not None:
        parse_image_ref(image)
    if isinstance(ports, (str, int)):
        raise UsageError(f"ports {ports!r}: give a list of guest ports, e.g. [8080]")
    numbers = []
    for port in ports:
        if isinstance(port, bool) or not (isinstance(port, int) or (isinstance(port, str) and port.isdigit())):
            raise UsageError(f"port {port!r} is not a port number", hint="ports are guest ports, 1-65535 (-p 8080)")
        if not 0 < int(port) < 65536:
            raise UsageError(f"port {port} is out of range", hint="ports are 1-65535")
        numbers.append(int(port))
    check_env(env)
    _check_out_dir(out_dir, force)
    return numbers


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory", hint="pick another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} is not empty", hint="pick another -o, or pass --force to replace an export")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out_dir}: {parent} is not a directory this user can write in",
                         hint="pick an -o in a directory of yours, e.g. -o ./out")


def _remove_previous(out_dir: Path) -> None:
    """What an earlier export wrote there (only that: --force never empties a directory)."""
    layout = out_dir / "oci"
    if layout.is_dir():
        shutil.rmtree(layout)
    (out_dir / "vm.yaml").unlink(missing_ok=True)
    for old in out_dir.glob("*.oci.tar"):
        old.unlink()


def export(
    spec: KubevirtSpec,
    out_dir: Path,
    *,
    archive: bool = False,
    force: bool = False,
    runner: Runner = DEFAULT_RUNNER,
) -> ExportResult:
    """Write the OCI image and vm.yaml for ``spec`` into ``out_dir``.

    Everything is built in a temp dir inside ``out_dir`` and renamed into place at the
    end, so a failed or interrupted export leaves no half-written layout behind (and an
    earlier export, replaced with ``force``, stays until the new one is complete).
    """
    check_inputs(out_dir, name=spec.name, image=spec.image, ports=spec.ports, env=spec.env, force=force)
    for path in (spec.kernel, spec.rootfs, *([spec.initrd] if spec.initrd else [])):
        if not path.is_file():
            raise StateError(f"{path} is missing", hint="rebuild the image: mvmctl build")
    plan = plan_probe(spec.health_checks)
    notes = list(plan.notes)
    ports = tuple(dict.fromkeys(spec.ports))
    if not ports and plan.ports:
        ports = plan.ports
        notes.append(f"no ports given: using the health checks' ({', '.join(map(str, ports))})")
    # Masquerade forwards only the listed ports; the probe's must be one of them.
    probe_port = plan.probe_port
    vm_ports = ports if probe_port is None or probe_port in ports else (*ports, probe_port)
    if not ports:
        notes.append("no ports: no Service, and the VM's interface forwards every port")
    kernel_args(spec)  # fail on a bad command line before the slow part
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # checked before the build; a file system may still refuse (read-only, /proc)
        raise UsageError(f"-o {out_dir}: cannot create it ({exc.strerror})", hint="pick another -o") from None
    with tempfile.TemporaryDirectory(prefix=".mvm-export-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        qcow2 = tmp / "rootfs.qcow2"
        _convert_rootfs(runner, spec.rootfs, qcow2)
        files = _layer_files(spec, qcow2)
        # The ref name is the image's tag; with no image given, one derived from content.
        provisional = parse_image_ref(spec.image) if spec.image else "latest"
        layout = oci.write_layout(tmp / "oci", files, ref_name=provisional,
                                  annotations={"org.opencontainers.image.title": spec.name})
        image = spec.image or f"{DEFAULT_REGISTRY}/{spec.name}:{layout.manifest.digest.split(':')[1][:12]}"
        if not spec.image:
            oci.set_ref_name(layout.path, parse_image_ref(image))
        docs = [virtual_machine(spec, image, plan, vm_ports)]
        svc = service(spec, ports)
        if svc is not None:
            docs.append(svc)
        (tmp / "vm.yaml").write_text(render_yaml(docs, yaml_header(spec, plan, notes)))
        if archive:
            oci.write_archive(layout.path, tmp / "image.oci.tar")
        # Only now, with everything written, replace what an earlier export left.
        _remove_previous(out_dir)
        layout_out: Path | None = None
        archive_out: Path | None = None
        if archive:
            archive_out = out_dir / f"{spec.name}.oci.tar"
            (tmp / "image.oci.tar").rename(archive_out)
            source = f"oci-archive:{archive_out}"
        else:
            layout_out = out_dir / "oci"
            layout.path.rename(layout_out)
            source = f"oci:{layout_out}:{parse_image_ref(image)}"
        (tmp / "vm.yaml").rename(out_dir / "vm.yaml")
    return ExportResult(
        out_dir=out_dir,
        vm_yaml=out_dir / "vm.yaml",
        layout=layout_out,
        archive=archive_out,
        image=image,
        manifest_digest=layout.manifest.digest,
        ports=ports,
        probe_from=plan.source,
        notes=tuple(notes),
        dropped=plan.dropped,
        push_argv=("skopeo", "copy", source, f"docker://{image}"),
        apply_argv=("kubectl", "apply", "-f", str(out_dir / "vm.yaml")),
    )
