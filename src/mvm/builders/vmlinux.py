#!/usr/bin/env python3
"""The uncompressed ELF ``vmlinux`` inside an x86 ``bzImage``, and whether QEMU can boot it.

Stdlib only, and runnable as a script, because ``nix/mkguest.nix`` runs this same file (with
a bare ``python3``) inside the image derivation, as it runs ``initrd.py``; the Debian builder
calls :func:`extract` through ``kernel.extract_vmlinux``.

Why: QEMU's ``microvm`` boots an ELF kernel straight at its PVH entry point, which skips the
in-guest decompression a bzImage does first (about 0.3 s under TCG). An ELF is bootable only
if it carries the PVH note (``XEN_ELFNOTE_PHYS32_ENTRY`` in a ``PT_NOTE`` segment, name
``Xen``), which ``CONFIG_PVH`` adds; without it QEMU refuses the ELF, and the bzImage is
the kernel to boot. nixpkgs' x86_64 kernels are bzImages with ``CONFIG_PVH`` set (through
``XEN_PVH``) and a zstd payload (``KERNEL_ZSTD``); Debian's use xz.

The payload is found through the bzImage setup header (``payload_offset``,
``payload_length``). gzip, xz, lzma and bzip2 payloads are decompressed with the stdlib;
zstd, lz4 and lzo with their command-line tools (``zstd``/``lz4``/``lzop`` on PATH), or with a
caller's ``external`` function (mvm's, which runs them through its process runner).

Usage (what mkGuest runs)::

    vmlinux.py KERNEL --out-dir DIR

writes ``DIR/vmlinux`` (the extracted ELF) when it has the PVH note, else a symlink
``DIR/<name of KERNEL>`` to KERNEL itself; and ``DIR/kernel.json``:
``{"kernel": NAME, "boot": "pvh" | "bzimage" | "elf" | "image", "kernel_note": TEXT | null}``
(``image``: not an x86 kernel, e.g. aarch64's ``Image``, booted as it is).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import struct
import subprocess
import sys
from collections.abc import Callable

ELF_MAGIC = b"\x7fELF"
PT_NOTE = 4
#: Xen's ELF note type for the 32-bit PVH entry point, which QEMU looks for.
XEN_ELFNOTE_PHYS32_ENTRY = 18

#: payload magic -> (format name, external tool or None for the stdlib)
FORMATS: list[tuple[bytes, str, str | None]] = [
    (b"\x1f\x8b", "gzip", None),
    (b"\xfd7zXZ\x00", "xz", None),
    (b"\x5d\x00\x00", "lzma", None),
    (b"BZh", "bzip2", None),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4", "lz4"),
    (b"\x89\x4c\x5a\x4f", "lzo", "lzop"),
]

#: external(tool, compressed bytes) -> decompressed bytes
External = Callable[[str, bytes], bytes]


class KernelFormatError(ValueError):
    """The file is not a kernel this module understands, or its payload is damaged."""


def is_bzimage(data: bytes) -> bool:
    return len(data) > 0x250 and data[0x202:0x206] == b"HdrS"


def payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage, located through its setup header."""
    if not is_bzimage(bzimage):
        raise KernelFormatError("not an x86 bzImage (no 'HdrS' setup header)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise KernelFormatError(f"bzImage boot protocol {version >> 8}.{version & 0xFF} has no payload fields")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    data = bzimage[start : start + length]
    if len(data) != length or not length:
        raise KernelFormatError("the bzImage is truncated (its payload runs past the end of the file)")
    return data


def run_tool(tool: str, data: bytes) -> bytes:
    """Decompress with a command-line tool, for the bare script only (mkGuest): this file
    cannot import mvm's runner, so mvm passes ``external`` instead, which runs the tool
    through its ``Runner`` (``kernel.extract_vmlinux``): a missing or failing tool is then an
    mvm error, with the install hint. The exit code is not trusted (lz4 exits 1 on the
    kernel's legacy frame), the ELF check after it decides."""
    try:
        proc = subprocess.run([tool, "-d", "-c", "-q"], input=data, capture_output=True, check=False)
    except FileNotFoundError:
        raise KernelFormatError(f"the kernel payload is {tool}-compressed and `{tool}` is not on PATH") from None
    return proc.stdout


def decompress(data: bytes, external: External | None = None) -> bytes:
    """The ELF a bzImage payload holds. Every format but gzip has the uncompressed size
    appended (the kernel's ``size_append``), which also checks the result."""
    found = next(((name, tool) for magic, name, tool in FORMATS if data.startswith(magic)), None)
    if found is None:
        raise KernelFormatError(f"unknown kernel payload compression (magic {data[:4].hex()})")
    name, tool = found
    body, expected = (data, None) if name == "gzip" else (data[:-4], struct.unpack("<I", data[-4:])[0])
    try:
        if name == "gzip":
            elf = gzip.decompress(body)
        elif name in ("xz", "lzma"):
            elf = lzma.decompress(body)
        elif name == "bzip2":
            elf = bz2.decompress(body)
        else:
            assert tool is not None
            elf = (external or run_tool)(tool, body)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise KernelFormatError(f"the {name} kernel payload does not decompress: {exc}") from None
    if expected is not None and len(elf) > expected:
        elf = elf[:expected]  # a tool that went on past the stream into the size field
    if not elf.startswith(ELF_MAGIC):
        raise KernelFormatError(f"the decompressed {name} payload is not an ELF file")
    if expected is not None and len(elf) != expected:
        raise KernelFormatError(f"the {name} payload gave {len(elf)} bytes, the bzImage says {expected}")
    return elf


def extract(kernel: bytes, external: External | None = None) -> bytes:
    """The ELF vmlinux of ``kernel`` (a bzImage, or already an ELF)."""
    if kernel.startswith(ELF_MAGIC):
        return kernel
    return decompress(payload(kernel), external)


def pvh_entry(elf: bytes) -> int | None:
    """The PVH entry address from the ELF's notes, or None if it has none."""
    if not elf.startswith(ELF_MAGIC) or len(elf) < 0x40:
        raise KernelFormatError("not an ELF file")
    is64 = elf[4] == 2
    order = "<" if elf[5] == 1 else ">"
    if is64:
        phoff, = struct.unpack_from(order + "Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", elf, 0x36)
    else:
        phoff, = struct.unpack_from(order + "I", elf, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", elf, 0x2A)
    for i in range(phnum):
        at = phoff + i * phentsize
        if is64:
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(order + "IIQQQQ", elf, at)
        else:
            p_type, p_offset, _, _, p_filesz = struct.unpack_from(order + "IIIII", elf, at)
        if p_type == PT_NOTE:
            entry = _xen_entry(elf[p_offset : p_offset + p_filesz], order)
            if entry is not None:
                return entry
    return None


def _xen_entry(notes: bytes, order: str) -> int | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from(order + "III", notes, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        name = notes[name_at : name_at + namesz].rstrip(b"\0")
        desc = notes[desc_at : desc_at + descsz]
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little" if order == "<" else "big")
        pos = desc_at + (descsz + 3) // 4 * 4
    return None


def choose(path: str, out_dir: str, external: External | None = None) -> dict[str, str | None]:
    """Write the kernel to boot into ``out_dir`` (see the module docstring); return the report."""
    with open(path, "rb") as f:
        kernel = f.read()
    name = os.path.basename(path)
    report: dict[str, str | None] = {"kernel": name, "boot": "image", "kernel_note": None}
    os.makedirs(out_dir, exist_ok=True)
    if is_bzimage(kernel):
        try:
            elf = decompress(payload(kernel), external)
            has_pvh = pvh_entry(elf) is not None
            why = "its vmlinux has no PVH ELF note (CONFIG_PVH is off)"
        except KernelFormatError as exc:
            elf, has_pvh, why = b"", False, f"no vmlinux could be extracted ({exc})"
        if has_pvh:
            with open(os.path.join(out_dir, "vmlinux"), "wb") as f:
                f.write(elf)
            report.update(kernel="vmlinux", boot="pvh")
            _write_report(out_dir, report)
            return report
        report.update(boot="bzimage", kernel_note=f"{name}: {why}, so QEMU boots the bzImage, which "
                      "decompresses itself in the guest (slower)")
    elif kernel.startswith(ELF_MAGIC):
        try:
            has_pvh = pvh_entry(kernel) is not None
        except (KernelFormatError, struct.error):
            has_pvh = False
        report["boot"] = "pvh" if has_pvh else "elf"
        if not has_pvh:
            report["kernel_note"] = f"{name}: an ELF kernel without a PVH ELF note (CONFIG_PVH is off): QEMU " \
                "cannot boot it"
    os.symlink(path, os.path.join(out_dir, name))
    _write_report(out_dir, report)
    return report


def _write_report(out_dir: str, report: dict[str, str | None]) -> None:
    with open(os.path.join(out_dir, "kernel.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("kernel", help="the kernel image (bzImage, vmlinux, or another architecture's Image)")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    report = choose(args.kernel, args.out_dir)
    print(f"kernel: {report['kernel']} (boot: {report['boot']})")
    if report["kernel_note"]:
        print(f"note: {report['kernel_note']}", file=sys.stderr)


if __name__ == "__main__":
    main()
