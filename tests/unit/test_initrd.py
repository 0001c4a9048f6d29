import io
from pathlib import Path

from mvm.builders.initrd import CpioWriter, build_initrd, load_order, module_name, parse_modules_dep

DEP = """kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
"""


def test_load_order_puts_dependencies_first() -> None:
    order = load_order(["virtio_blk", "virtio-net", "not_a_module"], parse_modules_dep(DEP))
    names = [module_name(p) for p in order]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_blk")
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert len(names) == len(set(names)) == 6


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries, pos = {}, 0
    while True:
        hdr = data[pos : pos + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_cpio_roundtrip() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)  # type: ignore[arg-type]
    w.dir("bin")
    w.file("init", b"#!/bin/sh\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.close()
    entries = _read_cpio(buf.getvalue())
    assert entries["init"] == (0o100755, b"#!/bin/sh\n")
    assert entries["bin/sh"][1] == b"busybox"


def test_build_initrd_packs_modules_in_order(tmp_path: Path) -> None:
    mods = tmp_path / "modules"
    for line in DEP.splitlines():
        rel = line.split(":")[0]
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".xz"):
            import lzma

            (mods / rel).write_bytes(lzma.compress(b"ELF-" + rel.encode()))
        else:
            (mods / rel).write_bytes(b"ELF-" + rel.encode())
    (mods / "modules.dep").write_text(DEP)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"BB")
    out = tmp_path / "initrd"
    build_initrd(str(mods), str(busybox), str(out), ["virtio_net"])
    entries = _read_cpio(out.read_bytes())
    assert entries["lib/modules/modules/virtio_net.ko"][1].startswith(b"ELF-")  # decompressed
    dep = entries["lib/modules/modules/modules.dep"][1].decode()
    assert "virtio_net.ko: net_failover.ko virtio.ko\n" in dep and "failover.ko\n" in dep
    init = entries["init"][1].decode()
    assert "modprobe -a failover net_failover virtio_ring virtio virtio_net " in init
    assert "switch_root /newroot" in init
