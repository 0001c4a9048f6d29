"""`mvmctl export --kubevirt`: documents valid (strictly) against pinned upstream schemas,
probes mapped or dropped with a reason, a host-free kernel command line, and an OCI
layout that standard tools read, reproducibly."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from mvm._proc import Completed
from mvm.backends import qemu_argv
from mvm.backends.base import LaunchSpec
from mvm.errors import CommandFailed, StateError, UsageError
from mvm.export import kubevirt, oci
from mvm.export.kubevirt import HealthCheckInput, KubevirtSpec
from mvm.export.probes import HttpGet, Recognised, TcpSocket, Unsupported, recognise
from mvm.paths import VMFiles

from . import kubevirt_schema

# --- fixtures ---------------------------------------------------------------------------------


def _image_dir(root: Path, *, health: dict[str, Any] | None = None, hostname: str | None = None) -> Path:
    """A small image directory shaped like `mvmctl build` output (manifest.json, vmlinux,
    initrd, rootfs.ext4); the rootfs is a sparse raw file, which is all qemu-img needs."""
    image = root / "image"
    image.mkdir()
    (image / "vmlinux").write_bytes(hashlib.sha256(b"kernel").digest() * 4096)
    (image / "initrd").write_bytes(b"initrd" * 1000)
    with open(image / "rootfs.ext4", "wb") as f:
        f.write(b"ext4-ish" * 512)
        f.truncate(8 * 1024 * 1024)
    guest: dict[str, Any] = {
        "name": "hello", "cpus": 2, "memory": 768,
        "services": {"hello": {"command": "python3 -m http.server 8080"}},
        "healthChecks": health if health is not None else {
            "hello": {"healthCmd": "curl -sf http://localhost:8080/", "healthIntervalSecs": 5},
        },
    }
    if hostname:
        guest["hostname"] = hostname
    manifest = {"schema_version": 2, "key": "k" * 64, "name": "hello", "frontend": "toml", "source": {},
                "kernel": "vmlinux", "initrd": "initrd", "rootfs": "rootfs.ext4", "guest": guest}
    (image / "manifest.json").write_text(json.dumps(manifest))
    return image


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    return _image_dir(tmp_path)


def _docs(spec: KubevirtSpec, ports: tuple[int, ...] = (8080,)) -> tuple[dict[str, Any], dict[str, Any]]:
    plan = kubevirt.plan_probe(spec.health_checks)
    vm = kubevirt.virtual_machine(spec, "registry.example.com/hello:v1", plan, ports)
    svc = kubevirt.service(spec, ports)
    assert svc is not None
    return vm, svc


# --- kernel command line -----------------------------------------------------------------------


def test_kernel_args_are_the_qemu_ones_minus_the_host(monkeypatch: pytest.MonkeyPatch, image: Path) -> None:
    monkeypatch.setattr(qemu_argv, "tsc_khz", lambda: 2_500_000)
    launch = LaunchSpec(name="hello", files=VMFiles(Path("/state/vms/hello")), kernel=Path("k"), initrd=None,
                        rootfs=Path("r"), cpus=1, memory=512, accel="tcg")
    under_qemu = qemu_argv.kernel_cmdline(launch).split()
    assert "tsc_early_khz=2500000" in under_qemu
    exported = kubevirt.kernel_args(kubevirt.spec_from_image(image)).split()
    assert "tsc_early_khz" not in " ".join(exported)
    # the same, but for what only suits mvm's own TCG machines (the TSC rate, trusting the TSC)
    assert exported == [a for a in under_qemu if not a.startswith("tsc")] + ["mvm.standalone=1"]
    assert {"console=ttyS0", "root=/dev/vda", "init=/usr/lib/mvm/init"} <= set(exported)


def test_kernel_args_carry_per_boot_settings_quoted(image: Path) -> None:
    env = {"GREETING": "hello world", "PORT": "8080", "NAME": "Zoë à", "TAB": "a\tb"}
    spec = kubevirt.spec_from_image(image, name="web-1", env=env)
    line = kubevirt.kernel_args(spec)
    assert line.endswith(' mvm.hostname=web-1 mvm.env.GREETING="hello world" mvm.env.NAME="Zoë à" '
                         'mvm.env.PORT=8080 mvm.env.TAB="a\tb"')
    from mvm.guest import cmdline  # the guest reads back exactly what was meant

    assert cmdline.settings(cmdline.split(line)) == {"standalone": True, "template": False, "vm": "web-1", "env": env}


def test_same_name_or_a_spec_hostname_sets_no_hostname(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = _image_dir(tmp_path / "a")
    assert "mvm.hostname" not in kubevirt.kernel_args(kubevirt.spec_from_image(plain))
    named = _image_dir(tmp_path / "b", hostname="fixed")
    assert "mvm.hostname" not in kubevirt.kernel_args(kubevirt.spec_from_image(named, name="other"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra_kernel_args": ["tsc_early_khz=2500000"]}, "exporting host"),
        ({"env": {"A": 'say "hi"'}}, "quote"),
        ({"env": {"A": "hi\x0binit=/bin/sh"}}, "control character"),  # the kernel splits at \v
        ({"env": {"A": "hi\u2028x"}}, "control character"),
        ({"env": {"BAD-NAME": "x"}}, "not a valid environment variable"),
        ({"env": {"BIG": "x" * 2100}}, "kernel command line would be"),
    ],
)
def test_bad_kernel_args_are_refused(image: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        kubevirt.kernel_args(kubevirt.spec_from_image(image, **kwargs))


# --- probes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "probe"),
    [
        ("curl -sf http://localhost:8080/", HttpGet(8080, "/")),
        ("curl -fsS -o /dev/null http://127.0.0.1:9000/healthz?deep=1", HttpGet(9000, "/healthz?deep=1")),
        ("curl --fail --silent https://localhost:8443/x", HttpGet(8443, "/x", "HTTPS")),
        ("curl -sf http://localhost:8080/ || exit 1", HttpGet(8080, "/")),
        ("curl -sf http://localhost:8080/ >/dev/null 2>&1", HttpGet(8080, "/")),
        ("curl -sfm 3 'http://localhost:81/a?b=1&c=2'", HttpGet(81, "/a?b=1&c=2")),
        ("/usr/bin/wget -q -O- http://localhost:3000/health", HttpGet(3000, "/health")),
        ("wget --spider -q http://localhost/", HttpGet(80, "/")),
        ("nc -z localhost 6379", TcpSocket(6379)),
        ("nc -z -w 2 127.0.0.1 5432", TcpSocket(5432)),
    ],
)
def test_recognised_health_checks(cmd: str, probe: HttpGet | TcpSocket) -> None:
    assert recognise(cmd) == Recognised(probe)


def test_curl_without_fail_becomes_a_tcp_check_with_a_note() -> None:
    found = recognise("curl -s http://localhost:8080/")
    assert isinstance(found, Recognised) and found.probe == TcpSocket(8080)
    assert found.note and "-f" in found.note


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        ("redis-cli ping", "qemu-guest-agent"),
        ("pg_isready -h localhost", "qemu-guest-agent"),
        ("curl -sf http://localhost:8080/ | grep ok", "pipeline"),
        ("test -f /tmp/ready && curl -sf http://localhost/", "pipeline"),
        ("curl -sf http://localhost:$PORT/", "substitution"),
        ("curl -sf http://example.com/", "not the guest itself"),
        ("curl -X POST -f http://localhost/", "plain GET"),
        ("curl -sf -H 'Host: a' http://localhost/", "plain GET"),
        ("nc localhost 80", "-z"),
        ("curl -sf http://localhost:99999/", "port"),
    ],
)
def test_unsupported_health_checks_say_why(cmd: str, reason: str) -> None:
    found = recognise(cmd)
    assert isinstance(found, Unsupported) and reason in found.reason


def test_plan_takes_the_first_mappable_check_and_reports_the_rest() -> None:
    checks = [
        HealthCheckInput("cache", "redis-cli ping"),
        HealthCheckInput("web", "curl -sf http://localhost:8080/ready", interval_secs=2.5, timeout_secs=0.5),
        HealthCheckInput("db", "nc -z localhost 5432"),
    ]
    plan = kubevirt.plan_probe(checks)
    assert plan.source == "web"
    assert plan.probe == {"httpGet": {"port": 8080, "path": "/ready", "scheme": "HTTP"}, "periodSeconds": 3,
                          "timeoutSeconds": 1, "failureThreshold": 1, "successThreshold": 1}
    assert [d.name for d in plan.dropped] == ["cache", "db"]
    assert "one readiness probe" in plan.dropped[1].reason
    assert plan.ports == (8080, 5432) and plan.probe_port == 8080


def test_an_explicit_probe_overrides_recognition() -> None:
    plan = kubevirt.plan_probe([HealthCheckInput("x", "custom-check", probe=TcpSocket(7000))])
    assert plan.probe is not None and plan.probe["tcpSocket"] == {"port": 7000}


# --- documents, validated strictly --------------------------------------------------------------


def test_vm_and_service_validate_strictly(image: Path) -> None:
    vm, svc = _docs(kubevirt.spec_from_image(image))
    assert kubevirt_schema.virtual_machine_errors(vm) == []
    assert kubevirt_schema.service_errors(svc) == []


def test_the_vm_has_what_kubevirt_needs(image: Path) -> None:
    vm, _ = _docs(kubevirt.spec_from_image(image))
    assert vm["apiVersion"] == "kubevirt.io/v1" and vm["kind"] == "VirtualMachine"
    vmi = vm["spec"]["template"]["spec"]
    boot = vmi["domain"]["firmware"]["kernelBoot"]
    assert boot["container"] == {"image": "registry.example.com/hello:v1", "kernelPath": "/boot/vmlinux",
                                 "initrdPath": "/boot/initrd"}
    assert "mvm.standalone=1" in boot["kernelArgs"] and "tsc_early_khz" not in boot["kernelArgs"]
    assert vmi["volumes"] == [{"name": "rootdisk", "containerDisk": {"image": "registry.example.com/hello:v1",
                                                                    "path": "/disk/rootfs.qcow2"}}]
    assert vmi["domain"]["devices"]["disks"] == [{"name": "rootdisk", "disk": {"bus": "virtio"}}]
    assert vmi["domain"]["devices"]["logSerialConsole"] is True
    assert vmi["domain"]["cpu"] == {"cores": 2} and vmi["domain"]["memory"] == {"guest": "768Mi"}
    [iface] = vmi["domain"]["devices"]["interfaces"]
    assert iface["masquerade"] == {} and iface["ports"] == [{"name": "tcp-8080", "port": 8080, "protocol": "TCP"}]
    assert vmi["networks"] == [{"name": "default", "pod": {}}]
    assert vmi["readinessProbe"]["httpGet"]["port"] == 8080


def test_the_service_selects_the_vms_pods(image: Path) -> None:
    vm, svc = _docs(kubevirt.spec_from_image(image), ports=(8080, 9090))
    pod_labels = vm["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector and selector.items() <= pod_labels.items()
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8080, 8080), (9090, 9090)]
    iface_ports = [p["port"] for p in vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["ports"]]
    assert iface_ports == [8080, 9090]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("spec", "template", "spec", "domain", "firmware", "kernelBoot"), "kernelArg"),  # a typo
        (("spec",), "running_strategy"),
        (("spec", "template", "spec", "domain", "devices", "interfaces", 0), "masquarade"),
        (("spec", "template", "spec", "volumes", 0, "containerDisk"), "imagePath"),
        (("spec", "template", "spec", "readinessProbe", "httpGet"), "url"),
        (("metadata",), "label"),
    ],
)
def test_an_unknown_field_is_an_error(image: Path, path: tuple[str | int, ...], field: str) -> None:
    vm, _ = _docs(kubevirt.spec_from_image(image))
    bad = copy.deepcopy(vm)
    node: Any = bad
    for key in path:
        node = node[key]
    node[field] = "x"
    errors = kubevirt_schema.virtual_machine_errors(bad)
    assert errors and any(repr(field) in e and "Additional properties" in e for e in errors), errors


def test_the_schema_still_rejects_wrong_types_and_missing_fields(image: Path) -> None:
    vm, svc = _docs(kubevirt.spec_from_image(image))
    wrong = copy.deepcopy(vm)
    wrong["spec"]["template"]["spec"]["domain"]["cpu"]["cores"] = "two"
    assert kubevirt_schema.virtual_machine_errors(wrong)
    missing = copy.deepcopy(vm)
    del missing["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"]
    assert any("'image' is a required property" in e for e in kubevirt_schema.virtual_machine_errors(missing))
    bad_svc = copy.deepcopy(svc)
    bad_svc["spec"]["ports"][0]["prot"] = "TCP"
    assert any("'prot' was unexpected" in e for e in kubevirt_schema.service_errors(bad_svc))
    bad_svc = copy.deepcopy(svc)
    bad_svc["spec"]["selectr"] = {}
    assert kubevirt_schema.service_errors(bad_svc)


def test_the_vendored_schemas_say_where_they_come_from() -> None:
    sources = kubevirt_schema.sources()
    kv = sources["kubevirt-v1.9.0-virtualmachine.json"]
    assert kv["release"] == "v1.9.0" and len(kv["commit"]) == 40 and kv["path"] == "api/openapi-spec/swagger.json"
    assert sources["kubernetes-v1.34.0-service.json"]["release"] == "v1.34.0"


def test_strictness_is_added_on_a_copy() -> None:
    vendored = json.loads(kubevirt_schema.KUBEVIRT_SCHEMA.read_text())
    strict = kubevirt_schema.strict(vendored["definitions"])
    assert strict["v1.KernelBoot"]["additionalProperties"] is False
    assert "additionalProperties" not in vendored["definitions"]["v1.KernelBoot"]
    labels = strict["k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"]["properties"]["labels"]
    assert labels["additionalProperties"] == {"type": "string", "default": ""}  # maps stay maps


# --- export: files, OCI layout, tools ------------------------------------------------------------


def _layer_digest_ok(layout: Path) -> dict[str, Any]:
    """Check every descriptor's digest and size against its blob; return the manifest."""
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["mediaType"] == oci.MEDIA_INDEX
    [desc] = index["manifests"]
    assert desc["mediaType"] == oci.MEDIA_MANIFEST

    def blob(descriptor: dict[str, Any]) -> bytes:
        algo, hexdigest = descriptor["digest"].split(":")
        data = (layout / "blobs" / algo / hexdigest).read_bytes()
        assert algo == "sha256" and hashlib.sha256(data).hexdigest() == hexdigest
        assert len(data) == descriptor["size"]
        return data

    manifest = json.loads(blob(desc))
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == oci.MEDIA_CONFIG
    config = json.loads(blob(manifest["config"]))
    [layer] = manifest["layers"]
    assert layer["mediaType"] == oci.MEDIA_LAYER_GZIP
    import gzip

    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(blob(layer))).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    return manifest


def test_export_writes_a_valid_layout_and_vm_yaml(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = kubevirt.export(kubevirt.spec_from_image(image, image="registry.example.com/team/hello:v1"), out)
    assert sorted(os.listdir(out)) == ["oci", "vm.yaml"]  # no temp dir left behind
    layout = out / "oci"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    _layer_digest_ok(layout)
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"][oci.REF_NAME_ANNOTATION] == "v1"
    assert result.manifest_digest == index["manifests"][0]["digest"]
    assert {p.stat().st_mode & 0o777 for p in (layout / "blobs" / "sha256").iterdir()} == {0o644}  # the layer too

    members = read_layer_members(layout)
    assert sorted(members) == ["boot", "boot/initrd", "boot/vmlinux", "disk", "disk/rootfs.qcow2"]
    for member in members.values():
        assert (member.uid, member.gid, member.mtime) == (107, 107, 0)
        assert member.uname == "" and member.gname == ""
    assert members["disk/rootfs.qcow2"].mode == 0o440 and members["disk/rootfs.qcow2"].isfile()
    assert members["boot/vmlinux"].mode == 0o444 and members["disk"].isdir()
    assert members["boot/vmlinux"].size == (image / "vmlinux").stat().st_size

    # the disk is the rootfs as qcow2, bit for bit
    qcow2 = tmp_path / "rootfs.qcow2"
    extract_layer_file(layout, "disk/rootfs.qcow2", qcow2)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(qcow2)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2"
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image / "rootfs.ext4"), str(qcow2)],
                   check=True, capture_output=True)

    docs = list(yaml.safe_load_all((out / "vm.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["VirtualMachine", "Service"]
    assert kubevirt_schema.virtual_machine_errors(docs[0]) == [] and kubevirt_schema.service_errors(docs[1]) == []
    assert docs[0]["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"] == \
        "registry.example.com/team/hello:v1"
    assert result.commands == [
        f"skopeo copy oci:{layout}:v1 docker://registry.example.com/team/hello:v1",
        f"kubectl apply -f {out / 'vm.yaml'}",
    ]
    assert result.ports == (8080,) and result.probe_from == "hello" and result.dropped == ()


def test_export_is_reproducible(tmp_path: Path) -> None:
    image = _image_dir(tmp_path)
    first = kubevirt.export(kubevirt.spec_from_image(image), tmp_path / "one")
    second = kubevirt.export(kubevirt.spec_from_image(image), tmp_path / "two")
    assert first.manifest_digest == second.manifest_digest
    assert sorted(os.listdir(tmp_path / "one" / "oci" / "blobs" / "sha256")) == \
        sorted(os.listdir(tmp_path / "two" / "oci" / "blobs" / "sha256"))
    assert (tmp_path / "one" / "vm.yaml").read_text() == (tmp_path / "two" / "vm.yaml").read_text()
    # with no --image, the tag comes from the content
    assert first.image == f"localhost:5000/hello:{first.manifest_digest[7:19]}"


def test_layouts_of_different_inputs_differ(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 10)
    la = oci.write_layout(tmp_path / "la", [oci.LayerFile("f", a)], ref_name="t")
    lb = oci.write_layout(tmp_path / "lb", [oci.LayerFile("f", b)], ref_name="t")
    assert la.manifest.digest != lb.manifest.digest and la.diff_id != lb.diff_id


def test_skopeo_and_umoci_read_the_layout_and_the_archive(image: Path, tmp_path: Path) -> None:
    layout_result = kubevirt.export(kubevirt.spec_from_image(image, image="registry.example.com/hello:v2"),
                                    tmp_path / "dir")
    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout_result.layout}:v2"], check=True,
                                          capture_output=True, text=True).stdout)
    assert inspected["Digest"] == layout_result.manifest_digest
    assert inspected["Os"] == "linux" and inspected["Architecture"] == "amd64" and len(inspected["Layers"]) == 1

    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout_result.layout}:v2", str(bundle)], check=True,
                   capture_output=True)
    disk = bundle / "rootfs" / "disk" / "rootfs.qcow2"
    assert (disk.stat().st_uid, disk.stat().st_gid, disk.stat().st_mode & 0o777) == (107, 107, 0o440)
    assert (bundle / "rootfs" / "boot" / "vmlinux").read_bytes() == (image / "vmlinux").read_bytes()

    archived = kubevirt.export(kubevirt.spec_from_image(image, image="registry.example.com/hello:v2"),
                               tmp_path / "tar", archive=True)
    assert archived.layout is None and archived.archive == tmp_path / "tar" / "hello.oci.tar"
    assert sorted(os.listdir(tmp_path / "tar")) == ["hello.oci.tar", "vm.yaml"]
    assert archived.manifest_digest == layout_result.manifest_digest
    with tarfile.open(archived.archive) as tar:
        names = tar.getnames()
    assert {"oci-layout", "index.json"} <= set(names) and all(not n.startswith("/") for n in names)
    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"oci-archive:{archived.archive}"], check=True,
                                          capture_output=True, text=True).stdout)
    assert inspected["Digest"] == archived.manifest_digest
    assert archived.commands[0] == f"skopeo copy oci-archive:{archived.archive} docker://registry.example.com/hello:v2"


def test_unmapped_checks_are_reported_in_the_result_and_the_yaml(tmp_path: Path) -> None:
    image = _image_dir(tmp_path, health={"cache": {"healthCmd": "redis-cli ping"}})
    result = kubevirt.export(kubevirt.spec_from_image(image, ports=[6379]), tmp_path / "out")
    assert result.probe_from is None
    assert [d.name for d in result.dropped] == ["cache"]
    text = (tmp_path / "out" / "vm.yaml").read_text()
    assert "# dropped health check 'cache'" in text and "qemu-guest-agent" in text
    assert "readinessProbe" not in yaml.safe_load_all(text).__next__()["spec"]["template"]["spec"]


def test_no_ports_means_no_service(tmp_path: Path) -> None:
    image = _image_dir(tmp_path, health={})
    result = kubevirt.export(kubevirt.spec_from_image(image), tmp_path / "out")
    docs = list(yaml.safe_load_all((tmp_path / "out" / "vm.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["VirtualMachine"]
    assert "ports" not in docs[0]["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]
    assert any("no Service" in n for n in result.notes)
    assert kubevirt_schema.virtual_machine_errors(docs[0]) == []


def test_the_probe_port_is_forwarded_even_if_not_a_service_port(tmp_path: Path) -> None:
    image = _image_dir(tmp_path, health={"admin": {"healthCmd": "curl -sf http://localhost:9901/ready"}})
    kubevirt.export(kubevirt.spec_from_image(image, ports=[8080]), tmp_path / "out")
    vm, svc = yaml.safe_load_all((tmp_path / "out" / "vm.yaml").read_text())
    iface = vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]
    assert [p["port"] for p in iface["ports"]] == [8080, 9901]
    assert [p["port"] for p in svc["spec"]["ports"]] == [8080]


def test_a_failed_conversion_leaves_nothing_behind(image: Path, tmp_path: Path) -> None:
    class FailingRunner:
        def run(self, argv: Any, **kw: Any) -> Completed:
            raise CommandFailed("convert the root filesystem to qcow2 failed (exit code 1)", argv=list(argv))

        def spawn(self, *a: Any, **kw: Any) -> Any:
            raise AssertionError("not used")

    out = tmp_path / "out"
    with pytest.raises(CommandFailed):
        kubevirt.export(kubevirt.spec_from_image(image), out, runner=FailingRunner())
    assert os.listdir(out) == []


def test_a_non_empty_output_dir_needs_force(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kubevirt.export(kubevirt.spec_from_image(image), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        kubevirt.export(kubevirt.spec_from_image(image), out)
    kubevirt.export(kubevirt.spec_from_image(image), out, force=True, archive=True)
    assert sorted(os.listdir(out)) == ["hello.oci.tar", "notes.txt", "vm.yaml"]  # the old layout is replaced


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "1web"}, UsageError, "cannot name"),
        ({"name": "Web"}, UsageError, "cannot name"),
        ({"image": "registry.example.com/hello@sha256:" + "0" * 64}, UsageError, "digest"),
        ({"image": "Registry Example/hello"}, UsageError, "not an image reference"),
        ({"ports": [0]}, UsageError, "out of range"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(image: Path, tmp_path: Path, kwargs: dict[str, Any],
                                                 error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        kubevirt.export(kubevirt.spec_from_image(image, **kwargs), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_x86_64_images_export(tmp_path: Path) -> None:
    image = _image_dir(tmp_path)
    manifest = json.loads((image / "manifest.json").read_text())
    (image / "manifest.json").write_text(json.dumps({**manifest, "arch": "aarch64"}))
    with pytest.raises(UsageError, match="aarch64") as caught:
        kubevirt.spec_from_image(image)
    assert "--arch x86_64" in (caught.value.hint or "")


def test_export_picks_the_image_of_the_architecture_asked_for(tmp_path: Path) -> None:
    """`export hello --arch x86_64` where hello was built for both: that one, not the newest."""
    from mvm._api.export import _resolve
    from mvm._api.progress import Quiet
    from mvm._proc import DEFAULT_RUNNER
    from mvm.builders.store import ImageStore, Manifest
    from mvm.paths import Layout
    from mvm.spec import GuestSpec

    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    for key, arch in (("a" * 32, "x86_64"), ("b" * 32, "aarch64")):  # aarch64 newest
        def make(staging: Path, arch: str = arch) -> Manifest:
            (staging / "rootfs.ext4").write_bytes(b"x")
            return Manifest(key="", name="hello", frontend="toml", source={}, guest=GuestSpec(name="hello"),
                            arch=arch)  # type: ignore[arg-type]
        ImageStore(layout.images).publish(key, make)
    for arch in ("x86_64", "aarch64"):
        assert _resolve("hello", None, (), arch, layout, DEFAULT_RUNNER, Quiet()).manifest.arch == arch
        assert _resolve("a" * 8 if arch == "x86_64" else "b" * 8, None, (), arch, layout, DEFAULT_RUNNER,
                        Quiet()).manifest.arch == arch
    # no --arch: the x86_64 one (what the export writes), though the aarch64 one is newer
    assert _resolve("hello", None, (), None, layout, DEFAULT_RUNNER, Quiet()).manifest.arch == "x86_64"
    with pytest.raises(UsageError, match="--arch arm64: mvm builds") as alias:
        _resolve("hello", None, (), "arm64", layout, DEFAULT_RUNNER, Quiet())
    assert "did you mean --arch aarch64" in (alias.value.hint or "")
    with pytest.raises(UsageError, match="no aarch64 image of 'aaaaaaaa' .only x86_64.") as caught:
        _resolve("a" * 8, None, (), "aarch64", layout, DEFAULT_RUNNER, Quiet())  # a key of another arch
    assert "--arch aarch64" in (caught.value.hint or "")


def test_an_out_dir_the_file_system_refuses_is_a_usage_error(tmp_path: Path) -> None:
    """/proc passes the write check for root; its mkdir's refusal is an error, not a traceback."""
    with pytest.raises(UsageError, match="-o /proc/mvm-x: cannot create it"):
        kubevirt.export(kubevirt.spec_from_image(_image_dir(tmp_path)), Path("/proc/mvm-x"))


def test_a_broken_image_dir_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="manifest.json is unreadable"):
        kubevirt.spec_from_image(tmp_path)
    image = _image_dir(tmp_path)
    (image / "initrd").unlink()
    with pytest.raises(StateError, match="initrd is missing"):
        kubevirt.export(kubevirt.spec_from_image(image), tmp_path / "out")


@pytest.mark.parametrize(
    ("ref", "tag"),
    [("hello", "latest"), ("localhost:5000/hello:abc", "abc"), ("quay.io/org/team/app:v1.2_3", "v1.2_3"),
     ("registry.example.com:443/a-b/c__d:1", "1")],
)
def test_image_refs(ref: str, tag: str) -> None:
    assert kubevirt.parse_image_ref(ref) == tag


# --- reading an exported OCI layout back (the checks above) -------------------------------

def layer_blob(layout: Path) -> Path:
    """The path of the (single) layer blob of the layout's first manifest."""
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    layer_digest: str = manifest["layers"][0]["digest"].split(":", 1)[1]
    return layout / "blobs" / "sha256" / layer_digest


def read_layer_members(layout: Path) -> dict[str, tarfile.TarInfo]:
    """Name -> header of every entry of the layout's layer (for checks)."""
    with tarfile.open(layer_blob(layout), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def extract_layer_file(layout: Path, member: str, dest: Path) -> None:
    """Copy one regular file of the layout's layer to ``dest`` (the simulated launcher
    boot takes the kernel, initrd and disk back out this way)."""
    with tarfile.open(layer_blob(layout), mode="r:gz") as tar:
        src = tar.extractfile(member)
        if src is None:
            raise KeyError(f"{member} is not a regular file in the layer")
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1024 * 1024)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image_ref": "Bad Ref"}, "not an image reference"),
    ({"name": "Bad_Name"}, "Bad_Name"),
    ({"ports": [70000]}, "port 70000 is out of range"),
])
def test_export_checks_what_it_was_given_before_building(tmp_path: Path, kwargs: dict[str, Any],
                                                         message: str) -> None:
    """A bad --image, --name or -p is refused at once, not after minutes of building the image
    (the target here does not even exist: resolving it would fail differently)."""
    import mvm
    from mvm.paths import Layout

    with pytest.raises(UsageError, match=message):
        mvm.export_kubevirt(str(tmp_path / "no-such-project"), out=tmp_path / "out",
                            layout=Layout(state=tmp_path / "s", cache=tmp_path / "c"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_of_a_spec_builds_for_x86_64_and_refuses_a_spec_that_says_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec that says arch = "aarch64" was built (minutes, emulated) and then refused; on an
    aarch64 host a spec that says nothing was built for the host, and refused too."""
    from mvm._api import export as export_api
    from mvm._api.progress import Quiet
    from mvm._proc import DEFAULT_RUNNER
    from mvm.paths import Layout

    asked: list[str | None] = []

    def build_image(*args: object, arch: str | None = None, **kwargs: object) -> tuple[None, bool]:
        asked.append(arch)  # the architecture the export would build for
        return None, False

    monkeypatch.setattr(export_api, "build_image", build_image)
    layout = Layout(state=tmp_path / "s", cache=tmp_path / "c")
    (tmp_path / "mvm.toml").write_text('name = "web"\n[services.web]\ncommand = "true"\n')
    export_api._resolve(str(tmp_path), None, (), None, layout, DEFAULT_RUNNER, Quiet())
    assert asked == ["x86_64"]
    (tmp_path / "mvm.toml").write_text('name = "web"\narch = "aarch64"\n[services.web]\ncommand = "true"\n')
    with pytest.raises(UsageError, match='the spec says arch = "aarch64"') as caught:
        export_api._resolve(str(tmp_path), None, (), None, layout, DEFAULT_RUNNER, Quiet())
    assert "--arch x86_64" in (caught.value.hint or "") and asked == ["x86_64"]  # no build
    export_api._resolve(str(tmp_path), None, (), "x86_64", layout, DEFAULT_RUNNER, Quiet())
    export_api._resolve(".", ".#hello", (), None, layout, DEFAULT_RUNNER, Quiet())  # #ATTR names the system
    assert asked == ["x86_64", "x86_64", None]
