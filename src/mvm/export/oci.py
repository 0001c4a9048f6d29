"""Write an OCI image layout (and optionally an ``oci-archive`` tar of it), reproducibly.

Why by hand rather than with a tool: the image is a single layer of three files, and what
KubeVirt needs from it is exact ownership (uid/gid 107, the ``qemu`` user its launcher runs
as) and stable digests, so a re-export of an unchanged image is a no-op for registries and
nodes. Neither ``umoci`` nor ``skopeo`` builds a layer from a file list with fixed owners
without a container runtime; Python's ``tarfile`` and ``gzip`` do, in a few lines.

Reproducibility: every tar header has a fixed mtime (0), owner, mode and empty user/group
names; entries are sorted; gzip gets ``mtime=0`` and no file name; JSON documents are
written with sorted keys and no whitespace; the config has no ``created`` time. Identical
inputs therefore give identical digests (with the same zlib, which decides the compressed
bytes).

Layout (https://github.com/opencontainers/image-spec, image-layout.md)::

    DIR/oci-layout                {"imageLayoutVersion": "1.0.0"}
    DIR/index.json                one manifest, tagged with org.opencontainers.image.ref.name
    DIR/blobs/sha256/<digest>     the layer (tar+gzip), the config and the manifest
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

#: Fixed metadata of every layer entry: the same bytes on every machine and every run.
LAYER_MTIME = 0
DIR_MODE = 0o755
GZIP_LEVEL = 6


@dataclass(frozen=True)
class LayerFile:
    """One regular file of the layer: ``path`` inside the image (relative, no leading
    ``/``), its content from ``source``, and its owner and mode there."""

    path: str
    source: Path
    mode: int = 0o444
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class OciLayout:
    """What :func:`write_layout` wrote."""

    path: Path
    ref_name: str
    manifest: Descriptor
    config: Descriptor
    layer: Descriptor
    diff_id: str  # digest of the uncompressed layer tar (the config's rootfs.diff_ids)


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _HashingWriter:
    """A write-only file object that counts and hashes what passes through it."""

    def __init__(self, inner: _Sink) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        pass  # the stream it wraps is flushed when it is closed


def _canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _check_layer_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"layer path {path!r} must be relative and normalised (no '.', '..' or '//')")
    return path


def _parent_dirs(paths: Iterable[str]) -> list[str]:
    dirs: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs)


def _tar_info(name: str, *, kind: bytes, mode: int, uid: int, gid: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = LAYER_MTIME
    info.size = size
    return info


def write_layer_tar(out: _Sink, files: Sequence[LayerFile]) -> None:
    """A tar stream of ``files`` and their parent directories, sorted, fixed metadata.

    Directories take the owner of the first file (in path order) below them, so a
    directory holding uid-107 files is itself owned by 107.
    """
    by_path = {_check_layer_path(f.path): f for f in files}
    if len(by_path) != len(files):
        raise ValueError("two layer files have the same path")
    dirs = _parent_dirs(by_path)
    entries: list[tuple[str, LayerFile | None]] = [(d, None) for d in dirs]
    entries += [(p, by_path[p]) for p in by_path]
    entries.sort(key=lambda e: e[0])
    # PAX format writes plain ustar headers when every field fits (no extended header, so
    # no per-run values), and still handles files over 8 GiB.
    # A "w|" stream only ever calls write() on its file object.
    with tarfile.open(fileobj=cast(BinaryIO, out), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path, layer_file in entries:
            if layer_file is None:
                owner = next(f for p, f in sorted(by_path.items()) if p.startswith(path + "/"))
                tar.addfile(_tar_info(path, kind=tarfile.DIRTYPE, mode=DIR_MODE, uid=owner.uid, gid=owner.gid))
                continue
            size = layer_file.source.stat().st_size
            info = _tar_info(path, kind=tarfile.REGTYPE, mode=layer_file.mode, uid=layer_file.uid,
                             gid=layer_file.gid, size=size)
            with open(layer_file.source, "rb") as src:
                tar.addfile(info, src)


def _write_blob(blobs: Path, data: bytes, media_type: str) -> Descriptor:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return Descriptor(media_type, f"sha256:{digest}", len(data))


def _write_layer_blob(blobs: Path, files: Sequence[LayerFile]) -> tuple[Descriptor, str]:
    """Stream the gzip'd layer into a temp file in ``blobs``, hashing the compressed bytes
    (the blob digest) and the tar bytes (the diff ID) on the way; rename it to its digest."""
    fd, tmp_name = tempfile.mkstemp(prefix=".layer.", dir=blobs)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = _HashingWriter(raw)
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed,
                               compresslevel=GZIP_LEVEL, mtime=0) as gz:
                uncompressed = _HashingWriter(gz)
                write_layer_tar(uncompressed, files)
        digest = compressed.sha.hexdigest()
        os.chmod(tmp, 0o644)  # as the layout's other blobs (mkstemp makes it 0600): skopeo may run as another user
        tmp.replace(blobs / digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Descriptor(MEDIA_LAYER_GZIP, f"sha256:{digest}", compressed.size), f"sha256:{uncompressed.sha.hexdigest()}"


def image_config(
    diff_id: str, *, architecture: str = "amd64", labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The OCI image config: no entrypoint (KubeVirt only reads files from the image), no
    ``created`` time (it would change the digest on every export)."""
    config: dict[str, Any] = {}
    if labels:
        config["Labels"] = dict(labels)
    return {
        "architecture": architecture,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }


def write_layout(
    dest: Path,
    files: Sequence[LayerFile],
    *,
    ref_name: str,
    architecture: str = "amd64",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> OciLayout:
    """Write a one-layer OCI image layout at ``dest`` (created; must not exist yet)."""
    dest.mkdir(parents=True)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer, diff_id = _write_layer_blob(blobs, files)
    config = _write_blob(blobs, _canonical_json(image_config(diff_id, architecture=architecture, labels=labels)),
                         MEDIA_CONFIG)
    manifest_doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    if annotations:
        manifest_doc["annotations"] = dict(annotations)
    manifest = _write_blob(blobs, _canonical_json(manifest_doc), MEDIA_MANIFEST)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{**manifest.to_json(), "annotations": {REF_NAME_ANNOTATION: ref_name}}],
    }
    (dest / "oci-layout").write_bytes(_canonical_json({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_bytes(_canonical_json(index))
    return OciLayout(dest, ref_name, manifest, config, layer, diff_id)


def set_ref_name(layout: Path, ref_name: str) -> None:
    """Rename the layout's image: index.json is outside every digest, so nothing else changes."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    index["manifests"][0].setdefault("annotations", {})[REF_NAME_ANNOTATION] = ref_name
    index_path.write_bytes(_canonical_json(index))


def write_archive(layout: Path, archive: Path) -> None:
    """Pack a layout directory into one uncompressed tar (what ``oci-archive:`` reads),
    with the same fixed metadata as the layer, atomically."""
    entries = sorted(p for p in layout.rglob("*"))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in entries:
                name = path.relative_to(layout).as_posix()
                if path.is_dir():
                    tar.addfile(_tar_info(name, kind=tarfile.DIRTYPE, mode=DIR_MODE, uid=0, gid=0))
                    continue
                info = _tar_info(name, kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, size=path.stat().st_size)
                with open(path, "rb") as src:
                    tar.addfile(info, src)
        os.chmod(tmp, 0o644)
        tmp.replace(archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
