"""A simulated KubeVirt launcher boot of an exported image (no cluster needed).

What virt-launcher does with the VM that `mvmctl export --kubevirt` writes, approximated
with plain QEMU:

- the kernel, initrd and root disk come out of the exported OCI image (unpacked by umoci,
  which keeps the layer's owners and modes), not from the mvm image store;
- QEMU runs as uid/gid 107 (virt-launcher's ``qemu`` user), so files the image does not
  give to 107 would fail to open;
- ``-M q35``, the disk as virtio-blk behind a throwaway qcow2 overlay (the containerDisk is
  read-only; KubeVirt writes to an overlay too), the kernel command line read from vm.yaml;
- user-mode networking shaped like masquerade: the guest is offered 10.0.2.2 by DHCP with
  gateway 10.0.2.1, and the host forward goes to 10.0.2.2 only, so a guest that ignored
  DHCP (mvm's static 10.0.2.15) would get no traffic;
- no mvm config disk, no virtio-serial agent or event channel: only the serial console.

The page must be served through the forward, and the serial log must carry the guest's
DHCP lease, the service's own log lines and the health check's transition to healthy.
Every process started here is killed at the end, and the test checks that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CLI, free_port, http_get, wait_for

QEMU_UID = QEMU_GID = 107
BOOT_TIMEOUT = 240.0  # TCG on a busy two-core machine


def _processes_with(token: str) -> list[int]:
    """Pids whose command line contains ``token`` (our QEMU's unique -name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(int(entry.name))
    return found


def _stop(proc: subprocess.Popen[bytes], token: str) -> None:
    """TERM the process group, then KILL; then make sure nothing carrying our token lives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for pid in _processes_with(token):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def launcher_dir() -> Iterator[Path]:
    """A work dir uid 107 can reach (pytest's tmp_path sits under a 0700 dir of root's)."""
    path = Path(tempfile.mkdtemp(prefix="mvm-kubevirt-e2e-", dir="/var/tmp"))
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_exported_image_boots_like_a_kubevirt_launcher(
    cli: CLI, hello_image: dict[str, Any], tmp_path: Path, launcher_dir: Path
) -> None:
    # 1. export with the CLI, from the built image's name
    r = cli("export", "hello", "--kubevirt", "-o", str(tmp_path / "export"), "--image",
            "registry.example.com/mvm/hello:e2e", "--json")
    result = json.loads(r.stdout)
    assert result["layout"] and result["commands"][0].startswith("skopeo copy oci:")
    assert result["commands"][1] == f"kubectl apply -f {tmp_path / 'export' / 'vm.yaml'}"
    vm, svc = yaml.safe_load_all(Path(result["vm_yaml"]).read_text())
    vmi = vm["spec"]["template"]["spec"]
    boot = vmi["domain"]["firmware"]["kernelBoot"]
    kernel_args = boot["kernelArgs"]
    assert "mvm.standalone=1" in kernel_args and "tsc_early_khz" not in kernel_args
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert vmi["readinessProbe"]["httpGet"] == {"port": 8080, "path": "/", "scheme": "HTTP"}

    # 2. take the files out of the OCI image the way a container runtime lays them out
    rootfs = launcher_dir / "rootfs"
    subprocess.run(["umoci", "raw", "unpack", "--image", f"{result['layout']}:e2e", str(rootfs)], check=True,
                   capture_output=True)
    kernel = rootfs / boot["container"]["kernelPath"].lstrip("/")
    initrd = rootfs / boot["container"]["initrdPath"].lstrip("/")
    disk = rootfs / vmi["volumes"][0]["containerDisk"]["path"].lstrip("/")
    for path in (kernel, initrd, disk):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (QEMU_UID, QEMU_GID), path
    assert disk.stat().st_mode & 0o777 == 0o440

    # 3. the launcher's writable layer over the read-only containerDisk
    run_dir = launcher_dir / "run"
    run_dir.mkdir()
    overlay = run_dir / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(overlay)],
                   check=True, capture_output=True)
    for path in (run_dir, overlay):
        os.chown(path, QEMU_UID, QEMU_GID)
    console = run_dir / "console.log"

    port = free_port()
    token = f"mvm-kv-e2e-{uuid.uuid4().hex[:12]}"
    argv = [
        "setpriv", f"--reuid={QEMU_UID}", f"--regid={QEMU_GID}", "--clear-groups", "--",
        "qemu-system-x86_64",
        "-name", token,
        "-M", "q35", "-accel", "tcg", "-cpu", "qemu64,+rdrand",
        "-smp", str(vmi["domain"]["cpu"]["cores"]), "-m", vmi["domain"]["memory"]["guest"].removesuffix("Mi"),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", kernel_args,
        "-drive", f"file={overlay},format=qcow2,if=none,id=root,cache=writeback",
        "-device", "virtio-blk-pci,drive=root",
        "-netdev", f"user,id=n0,net=10.0.2.0/24,host=10.0.2.1,dhcpstart=10.0.2.2,"
                   f"hostfwd=tcp:127.0.0.1:{port}-10.0.2.2:8080",
        "-device", "virtio-net-pci,netdev=n0",
        "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
    ]
    qemu_log = open(tmp_path / "qemu.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
                            cwd=run_dir, start_new_session=True)

    def console_text() -> str:
        try:
            return console.read_text(errors="replace")
        except OSError:
            return ""

    def alive_or_fail() -> None:
        if proc.poll() is not None:
            raise AssertionError(
                f"QEMU exited with {proc.returncode}\n--- qemu\n{(tmp_path / 'qemu.log').read_text()}"
                f"\n--- console\n{console_text()[-4000:]}")

    try:
        # 4. the page, through the forward to the DHCP address
        try:
            page = http_get(port, timeout=BOOT_TIMEOUT)
        except AssertionError:
            alive_or_fail()
            raise AssertionError(f"no page through the forward\n--- console\n{console_text()[-4000:]}") from None
        assert page == "<h1>Hello from mvm!</h1>\n"

        # 5. the serial console tells the story: standalone, DHCP lease, service lines, health
        def console_has_everything() -> bool:
            alive_or_fail()
            text = console_text()
            return all(re.search(p, text, re.M) for p in (
                r"standalone",
                r"network: \S+ 10\.0\.2\.2/24 via 10\.0\.2\.1",
                r"\[service hello\] running",
                r' hello \| .*"GET / HTTP/1\.1" 200',
                r"\[health hello\] healthy \(exit 0\)",
            ))

        try:
            wait_for(console_has_everything, timeout=60, what="the console lines")
        except AssertionError:
            raise AssertionError(f"console is missing lines\n--- console\n{console_text()[-6000:]}") from None
        text = console_text()
        assert "mvm-init: ready" in text
        assert '{"t":' not in text  # readable lines, not the JSON event stream
        assert "10.0.2.15" not in text  # the static address of `mvmctl up` was not used
    finally:
        _stop(proc, token)
        qemu_log.close()
        time.sleep(0.2)
        leftovers = _processes_with(token)
        assert not leftovers, f"processes left behind: {leftovers}"
