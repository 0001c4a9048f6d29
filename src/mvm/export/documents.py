"""The KubeVirt ``VirtualMachine`` and ``Service`` documents for an exported mvm image.

Pure functions of a :class:`KubevirtSpec`: the kernel command line (nothing from the
exporting host, standalone mode on, per-boot settings as ``mvm.*`` parameters), the
readiness probe planned from the health checks (``probes.py`` says which commands map),
and the two documents, rendered as one multi-document vm.yaml. ``kubevirt.export`` writes
them next to the OCI image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from ..guest.protocol import INIT_PATH
from ..names import ENV_NAME_RE
from .probes import HttpGet, Probe, Recognised, Unsupported, recognise

#: The uid/gid of the ``qemu`` user in virt-launcher; kernelBoot and containerDisk files
#: must be readable by it.
QEMU_UID = 107
KERNEL_PATH = "/boot/vmlinux"
INITRD_PATH = "/boot/initrd"
DISK_PATH = "/disk/rootfs.qcow2"
#: x86's COMMAND_LINE_SIZE: the kernel truncates a longer command line.
MAX_CMDLINE = 2048
#: Labels put on the VM's pods (spec.template.metadata) and selected by the Service.
NAME_LABEL = "app.kubernetes.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "mvm"
DEFAULT_REGISTRY = "localhost:5000"

#: The parts of ``backends.qemu_argv.kernel_cmdline`` that describe the guest rather than the
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


# --- names --------------------------------------------------------------------------------


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


# --- kernel command line ------------------------------------------------------------------


#: Values made only of these go unquoted; any other is quoted. The kernel splits arguments
#: at more than a space (a vertical tab, a form feed, and the byte 0xa0 of many UTF-8
#: characters), and the guest's split at every character Python calls a space: unquoted,
#: `A=hi\vinit=/bin/sh` was two arguments.
_UNQUOTED = re.compile(r"[A-Za-z0-9._,:/@%+=-]+")


def _kernel_value(key: str, value: str) -> str:
    if '"' in value or any(not c.isprintable() and c != "\t" for c in value):
        raise UsageError(f"{key} cannot be passed on the kernel command line (it contains a quote or a "
                         f"control character: {value!r})",
                         hint="bake the value into the image (the service's env in mvm.toml) instead")
    return f"{key}={value}" if _UNQUOTED.fullmatch(value) else f'{key}="{value}"'


def check_env(env: Mapping[str, str]) -> None:
    """``-e`` values that can ride the kernel command line (checked before a build)."""
    for key, value in env.items():
        _kernel_value(f"mvm.env.{key}", value)


def kernel_args(spec: KubevirtSpec) -> str:
    """The guest's kernel command line under KubeVirt: nothing host-specific, standalone
    mode on, per-boot settings (hostname, env overrides) as ``mvm.*`` parameters."""
    for arg in spec.extra_kernel_args:
        if arg.split("=", 1)[0] in HOST_SPECIFIC_ARGS:
            raise UsageError(f"kernel argument {arg!r} describes the exporting host, not the cluster's nodes",
                             hint="leave it out: KubeVirt runs the guest under KVM")
    args = [*BASE_KERNEL_ARGS, f"init={INIT_PATH}", STANDALONE_ARG]
    if spec.hostname:
        args.append(_kernel_value("mvm.hostname", spec.hostname))
    for key, value in sorted(spec.env.items()):
        if not ENV_NAME_RE.fullmatch(key):
            raise UsageError(f"{key!r} is not a valid environment variable name",
                             hint="letters, digits and _, not starting with a digit (-e NAME=VALUE)")
        args.append(_kernel_value(f"mvm.env.{key}", value))
    args += spec.extra_kernel_args
    line = " ".join(args)
    if len(line) >= MAX_CMDLINE:
        raise UsageError(f"the kernel command line would be {len(line)} bytes; the kernel keeps {MAX_CMDLINE - 1}",
                         hint="bake long values into the image (the service's env in mvm.toml) instead")
    return line


# --- probes -------------------------------------------------------------------------------


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


# --- documents ----------------------------------------------------------------------------


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


def yaml_header(spec: KubevirtSpec, plan: ProbePlan, notes: Sequence[str]) -> list[str]:
    lines = [f"{spec.name}: a KubeVirt VirtualMachine exported by mvm (mvmctl export --kubevirt).",
             "Push the image first (see docs/kubernetes.md), then: kubectl apply -f vm.yaml"]
    if plan.source:
        lines.append(f"readinessProbe: from health check {plan.source!r}")
    for check in plan.dropped:
        lines.append(f"dropped health check {check.name!r}: {check.reason}")
    lines += notes
    return lines
