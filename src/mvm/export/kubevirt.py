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

import json
import math
import re
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._proc import DEFAULT_RUNNER, Runner
from ..errors import CommandFailed, StateError, UsageError
from . import oci
from .probes import HttpGet, Probe, Recognised, Unsupported, recognise

#: The uid/gid of the ``qemu`` user in virt-launcher; kernelBoot and containerDisk files
#: must be readable by it.
QEMU_UID = 107
KERNEL_PATH = "/boot/vmlinux"
INITRD_PATH = "/boot/initrd"
DISK_PATH = "/disk/rootfs.qcow2"
INIT = "/usr/lib/mvm/init"
#: x86's COMMAND_LINE_SIZE: the kernel truncates a longer command line.
MAX_CMDLINE = 2048
#: Labels put on the VM's pods (spec.template.metadata) and selected by the Service.
NAME_LABEL = "app.kubernetes.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "mvm"
DEFAULT_REGISTRY = "localhost:5000"

#: The parts of ``backends.qemu.kernel_cmdline`` that describe the guest rather than the
#: host (a unit test keeps them in step): ttyS0 is the serial console on q35 as on
#: microvm, and KubeVirt's containerDisk is the first (and only) virtio disk.
BASE_KERNEL_ARGS = ("console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "quiet", "cryptomgr.notests")
STANDALONE_ARG = "mvm.standalone=1"
#: Kernel arguments that describe the exporting host, refused in ``extra_kernel_args``.
HOST_SPECIFIC_ARGS = ("tsc_early_khz",)

_K8S_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS-1035 label (Service names need it)
_IMAGE_REF = re.compile(
    r"^(?:(?P<registry>[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?)/)?"
    r"(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class HealthCheckInput:
    """One mvm health check, as the spec has it; ``probe`` overrides command recognition."""

    name: str
    cmd: str
    interval_secs: float = 30.0
    timeout_secs: float = 10.0
    probe: Probe | None = None


@dataclass(frozen=True)
class KubevirtSpec:
    """Everything the export needs, independent of where it came from (see
    :func:`spec_from_image`). ``image`` is the reference vm.yaml points at; ``None``
    means ``localhost:5000/NAME:<first 12 hex of the manifest digest>``."""

    name: str
    kernel: Path
    initrd: Path | None
    rootfs: Path
    cpus: int = 1
    memory_mib: int = 512
    ports: tuple[int, ...] = ()
    health_checks: tuple[HealthCheckInput, ...] = ()
    image: str | None = None
    hostname: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    extra_kernel_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class DroppedCheck:
    name: str
    reason: str


@dataclass(frozen=True)
class ProbePlan:
    """Which check became the readiness probe, and what happened to the others."""

    probe: dict[str, Any] | None
    source: str | None  # the name of the check it came from
    notes: tuple[str, ...]
    dropped: tuple[DroppedCheck, ...]
    ports: tuple[int, ...]  # every port a recognised check touches
    probe_port: int | None = None


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


# --- input ------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not _K8S_NAME.fullmatch(name):
        raise UsageError(f"{name!r} cannot name a KubeVirt VM and its Service",
                         hint="use 1-63 characters of a-z, 0-9 and '-', starting with a letter")
    return name


def parse_image_ref(ref: str) -> str:
    """Check a ``[registry/]repo[:tag]`` reference; return its tag (``latest`` if none)."""
    if "@" in ref:
        raise UsageError(f"image reference {ref!r} has a digest",
                         hint="give a tag (REGISTRY/REPO:TAG); the digest is only known once the image is pushed")
    match = _IMAGE_REF.fullmatch(ref)
    if not match:
        raise UsageError(f"{ref!r} is not an image reference",
                         hint="use REGISTRY/REPO:TAG, e.g. registry.example.com:5000/hello:v1")
    return match.group("tag") or "latest"


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
    try:
        manifest = json.loads((image_dir / "manifest.json").read_text())
        guest = manifest["guest"]
        image_name = str(manifest["name"])
        kernel = image_dir / manifest.get("kernel", "vmlinux")
        initrd_name = manifest.get("initrd", "initrd")
        rootfs = image_dir / manifest.get("rootfs", "rootfs.ext4")
        checks = tuple(
            HealthCheckInput(
                name=check_name_,
                cmd=str(check["healthCmd"]),
                interval_secs=float(check.get("healthIntervalSecs", 30)),
                timeout_secs=float(check.get("healthTimeoutSecs", 10)),
            )
            for check_name_, check in sorted((guest.get("healthChecks") or {}).items())
        )
        cpus, memory = int(guest.get("cpus", 1)), int(guest.get("memory", 512))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"{image_dir} is not a readable mvm image: {exc}",
                         hint="pass the image directory that `mvmctl build --json` prints as path") from exc
    vm_name = name or image_name
    hostname = vm_name if vm_name != image_name and not guest.get("hostname") else None
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


# --- kernel command line ----------------------------------------------------------------


def _kernel_value(key: str, value: str) -> str:
    if '"' in value or "\n" in value:
        raise UsageError(f"{key} cannot be passed on the kernel command line (it contains a quote or a newline)",
                         hint="bake the value into the image (the service's env in mvm.toml) instead")
    return f'{key}="{value}"' if (" " in value or "\t" in value or not value) else f"{key}={value}"


def kernel_args(spec: KubevirtSpec) -> str:
    """The guest's kernel command line under KubeVirt: nothing host-specific, standalone
    mode on, per-boot settings (hostname, env overrides) as ``mvm.*`` parameters."""
    for arg in spec.extra_kernel_args:
        if arg.split("=", 1)[0] in HOST_SPECIFIC_ARGS:
            raise UsageError(f"kernel argument {arg!r} describes the exporting host, not the cluster's nodes",
                             hint="leave it out: KubeVirt runs the guest under KVM")
    args = [*BASE_KERNEL_ARGS, f"init={INIT}", STANDALONE_ARG]
    if spec.hostname:
        args.append(_kernel_value("mvm.hostname", spec.hostname))
    for key, value in sorted(spec.env.items()):
        if not _ENV_NAME.fullmatch(key):
            raise UsageError(f"{key!r} is not a valid environment variable name")
        args.append(_kernel_value(f"mvm.env.{key}", value))
    args += spec.extra_kernel_args
    line = " ".join(args)
    if len(line) >= MAX_CMDLINE:
        raise UsageError(f"the kernel command line would be {len(line)} bytes; the kernel keeps {MAX_CMDLINE - 1}",
                         hint="bake long values into the image (the service's env in mvm.toml) instead")
    return line


# --- probes -----------------------------------------------------------------------------


def _probe_doc(probe: Probe, check: HealthCheckInput) -> dict[str, Any]:
    action: dict[str, Any]
    if isinstance(probe, HttpGet):
        action = {"httpGet": {"port": probe.port, "path": probe.path, "scheme": probe.scheme}}
    else:
        action = {"tcpSocket": {"port": probe.port}}
    return {
        **action,
        "periodSeconds": max(1, math.ceil(check.interval_secs)),
        "timeoutSeconds": max(1, math.ceil(check.timeout_secs)),
        # mvm calls a check unhealthy on its first failure after the grace period, and
        # healthy on its first pass: the same thresholds here.
        "failureThreshold": 1,
        "successThreshold": 1,
    }


def plan_probe(checks: Sequence[HealthCheckInput]) -> ProbePlan:
    """Map the checks onto at most one readiness probe (a VMI has one); say what is lost."""
    probe: dict[str, Any] | None = None
    source: str | None = None
    probe_port: int | None = None
    notes: list[str] = []
    dropped: list[DroppedCheck] = []
    ports: list[int] = []
    for check in checks:
        found: Recognised | Unsupported = Recognised(check.probe) if check.probe else recognise(check.cmd)
        if isinstance(found, Unsupported):
            dropped.append(DroppedCheck(check.name, found.reason))
            continue
        ports.append(found.probe.port)
        if probe is not None:
            dropped.append(DroppedCheck(check.name, f"a KubeVirt VM has one readiness probe; it comes from {source!r}"))
            continue
        probe, source, probe_port = _probe_doc(found.probe, check), check.name, found.probe.port
        if found.note:
            notes.append(f"health check {check.name!r}: {found.note}")
    return ProbePlan(probe, source, tuple(notes), tuple(dropped), tuple(dict.fromkeys(ports)), probe_port)


# --- documents --------------------------------------------------------------------------


def pod_labels(name: str) -> dict[str, str]:
    """The labels on the VM's pods, which the Service selects."""
    return {NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY}


def _port_name(port: int) -> str:
    return f"tcp-{port}"  # an IANA_SVC_NAME: at most 15 characters, lowercase, a letter


def virtual_machine(spec: KubevirtSpec, image: str, plan: ProbePlan, ports: Sequence[int]) -> dict[str, Any]:
    """The ``kubevirt.io/v1`` VirtualMachine document."""
    container: dict[str, Any] = {"image": image, "kernelPath": KERNEL_PATH}
    if spec.initrd is not None:
        container["initrdPath"] = INITRD_PATH
    interface: dict[str, Any] = {"name": "default", "masquerade": {}}
    if ports:
        interface["ports"] = [{"name": _port_name(p), "port": p, "protocol": "TCP"} for p in ports]
    vmi_spec: dict[str, Any] = {
        "domain": {
            "cpu": {"cores": spec.cpus},
            "memory": {"guest": f"{spec.memory_mib}Mi"},
            "firmware": {"kernelBoot": {"container": container, "kernelArgs": kernel_args(spec)}},
            "devices": {
                "disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}],
                "interfaces": [interface],
                # The guest writes service logs and health transitions to its serial
                # console; this streams it from the launcher pod's guest-console-log
                # container even where the cluster turned that off by default.
                "logSerialConsole": True,
            },
        },
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [{"name": "rootdisk", "containerDisk": {"image": image, "path": DISK_PATH}}],
        "terminationGracePeriodSeconds": 30,
    }
    if plan.probe is not None:
        vmi_spec["readinessProbe"] = plan.probe
    labels = pod_labels(spec.name)
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": spec.name, "labels": dict(labels)},
        "spec": {
            "runStrategy": "Always",
            "template": {"metadata": {"labels": dict(labels)}, "spec": vmi_spec},
        },
    }


def service(spec: KubevirtSpec, ports: Sequence[int]) -> dict[str, Any] | None:
    """A ClusterIP Service for ``ports`` selecting the VM's pods (None without ports)."""
    if not ports:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "labels": pod_labels(spec.name)},
        "spec": {
            "type": "ClusterIP",
            "selector": pod_labels(spec.name),
            "ports": [{"name": _port_name(p), "port": p, "targetPort": p, "protocol": "TCP"} for p in ports],
        },
    }


def render_yaml(docs: Sequence[dict[str, Any]], header: Sequence[str] = ()) -> str:
    """Multi-document YAML, keys in the order written, with ``# `` header lines."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return comment + yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False, explicit_start=True,
                                     width=MAX_CMDLINE * 2)


def _header(spec: KubevirtSpec, plan: ProbePlan, notes: Sequence[str]) -> list[str]:
    lines = [f"{spec.name}: a KubeVirt VirtualMachine exported by mvm (mvmctl export --kubevirt).",
             "Push the image first (see docs/kubernetes.md), then: kubectl apply -f vm.yaml"]
    if plan.source:
        lines.append(f"readinessProbe: from health check {plan.source!r}")
    for check in plan.dropped:
        lines.append(f"dropped health check {check.name!r}: {check.reason}")
    lines += notes
    return lines


# --- export -----------------------------------------------------------------------------


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


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory", hint="pick another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} is not empty", hint="pick another -o, or pass --force to replace an export")


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
    check_name(spec.name)
    if spec.image is not None:
        parse_image_ref(spec.image)
    for path in (spec.kernel, spec.rootfs, *([spec.initrd] if spec.initrd else [])):
        if not path.is_file():
            raise StateError(f"{path} is missing", hint="rebuild the image: mvmctl build")
    for port in spec.ports:
        if not 0 < port < 65536:
            raise UsageError(f"port {port} is out of range", hint="ports are 1-65535")
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
    _check_out_dir(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        (tmp / "vm.yaml").write_text(render_yaml(docs, _header(spec, plan, notes)))
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
