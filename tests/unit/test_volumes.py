"""Volumes without a VM: -v parsing and validation, the store and its lock, ext4 images built
and inspected on the host (mkfs.ext4/debugfs run for real: they take milliseconds), the
undo of a failed up, and the export merge rules."""

from __future__ import annotations

import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from mvm import _ext4 as ext4
from mvm._api import volume_attach as volumes
from mvm._api.volume_attach import plan
from mvm._api.volumes import volume_export, volume_ls, volume_rm
from mvm._proc import DEFAULT_RUNNER
from mvm.errors import ExportConflicts, UsageError, VolumeError
from mvm.paths import Layout, VMFiles
from mvm.volumes.args import parse_volume, parse_volumes
from mvm.volumes.store import VolumeStore, volume_id

DEAD_PID = 2**22 + 12345  # above pid_max's default: never a live process

# --- parsing ---------------------------------------------------------------------------


def test_forms(tmp_path: Path) -> None:
    ro = parse_volume("./config:/mnt/config", tmp_path)
    assert (ro.host, ro.guest, ro.mode, ro.size_mb, ro.secret) == (tmp_path / "config", "/mnt/config", "ro",
                                                                     None, False)
    assert parse_volume("./c:/etc/app:ro", tmp_path).mode == "ro"
    secret = parse_volume("./c:/opt/creds:secret", tmp_path)
    assert secret.mode == "secret" and secret.secret
    rw = parse_volume("./data:/mnt/data:1024", tmp_path)
    assert (rw.mode, rw.size_mb, rw.writable) == ("rw", 1024, True)


def test_secrets_rule_is_any_path_containing_secret(tmp_path: Path) -> None:
    for guest in ("/run/secrets", "/etc/app/secrets/db", "/mnt/app-Secret"):
        assert parse_volume(f"./s:{guest}", tmp_path).secret, guest
    assert not parse_volume("./s:/mnt/config", tmp_path).secret


def test_host_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_volume("~/cfg:/mnt/c").host == tmp_path / "cfg"
    assert parse_volume("./a:b:/mnt/c", tmp_path).host == tmp_path / "a:b"  # HOST may contain ':'
    assert parse_volume("./a:b:/mnt/c:64", tmp_path).host == tmp_path / "a:b"
    assert parse_volume("x:/mnt//c/./d/", tmp_path).guest == "/mnt/c/d"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("./config", "expected HOST:/guest/path"),
        (":/mnt/c", "HOST is empty"),
        ("./c:mnt/config", "guest path 'mnt/config' is not absolute"),
        ("./c:mnt/config:64", "guest path 'mnt/config' is not absolute"),
        ("./c:", "the guest path is empty"),
        ("./c:/", "guest path / is reserved"),
        ("./c:/proc", "guest path /proc is reserved"),
        ("./c:/sys", "guest path /sys is reserved"),
        ("./c:/dev", "guest path /dev is reserved"),
        ("./c:/dev/shm", "guest path /dev/shm is reserved"),
        ("./c:/usr/lib/mvm", "is reserved"),
        ("./c:/etc", "guest path /etc is reserved"),
        ("./c:/usr/lib", "guest path /usr/lib is reserved: the volume would hide /usr/lib"),  # and /usr/lib/mvm
        ("./c:/usr/bin/", "guest path /usr/bin is reserved"),  # merged /usr: the services' /bin/sh
        ("./c:/mnt/../etc", "contains '..'"),
        ("./d:/mnt/d:0", "size 0 MiB: a volume's size must be a positive number of MiB"),
        ("./d:/mnt/d:64:secrets", "'secrets' is not an option"),  # was a plain writable volume
        ("./d:/mnt/d:64:128", "'128' is not an option: give ro, or one size in MiB"),
        ("./d:/mnt/d:-5", "size -5 MiB: a volume's size must be a positive number of MiB"),
        ("./d:/mnt/d:abc", "'abc' is neither a size in MiB nor 'ro' or 'secret'"),
        ("./d:/mnt/d:1.5", "'1.5' is neither a size in MiB"),
        ("./d:/mnt/d:1G", "'1G' is neither a size in MiB"),
        ("./d:/mnt/d:4", "size 4 MiB is too small"),
        ("./d:/mnt/d:99999999", "too large"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_volume(text, tmp_path)
    assert fragment in info.value.message
    assert info.value.message.startswith(f"-v {text!r}: ")
    assert info.value.hint


def test_combinations(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="two volumes on one guest path /mnt/x"):
        parse_volumes(["./a:/mnt/x", "./b:/mnt/x/"], tmp_path)
    with pytest.raises(UsageError, match="volumes cannot be nested: /mnt/x/y .* is inside /mnt/x"):
        parse_volumes(["./a:/mnt/x/y", "./b:/mnt/x:64"], tmp_path)
    with pytest.raises(UsageError, match="given twice as a writable volume"):
        parse_volumes(["./a:/mnt/x:64", "./a:/mnt/y:64"], tmp_path)
    both = parse_volumes(["./a:/mnt/x", "./a:/mnt/y", "./a:/mnt/xy"], tmp_path)  # same dir read-only twice
    assert [v.guest for v in both] == ["/mnt/x", "/mnt/y", "/mnt/xy"]


def test_volume_id_is_stable_and_readable() -> None:
    vid = volume_id(Path("/home/me/My Data"))
    assert vid.startswith("my-data-") and len(vid) == len("my-data-") + 8
    assert vid == volume_id(Path("/home/me/My Data")) != volume_id(Path("/home/you/My Data"))


# --- planning against the host ---------------------------------------------------------


def _mkext4(path: Path, mb: int) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-T", "default", str(path), f"{mb}M"], check=True)


def test_plan_refuses_bad_hosts_and_creates_nothing(tmp_path: Path, layout: Layout) -> None:
    (tmp_path / "notes.txt").write_text("not an image\n")
    cases = {
        "./missing:/mnt/c": "HOSTDIR " + str(tmp_path / "missing") + " does not exist",
        "./notes.txt:/mnt/c": "is not a directory",
        "./notes.txt:/mnt/d:64": "is an existing file but not an ext4 image",
    }
    cases["./typo/data:/mnt/d:64"] = "neither " + str(tmp_path / "typo" / "data") + " nor its parent directory exists"
    for text, fragment in cases.items():
        with pytest.raises(VolumeError) as info:
            plan([text], layout, cwd=tmp_path)
        assert fragment in info.value.message, text
    assert not layout.state.exists()
    assert (tmp_path / "notes.txt").read_text() == "not an image\n"


def test_plan_refuses_a_seed_that_does_not_fit(tmp_path: Path, layout: Layout) -> None:
    (tmp_path / "big").mkdir()
    with open(tmp_path / "big" / "blob", "wb") as f:
        f.truncate(20 * 1024 * 1024)  # sparse, but counted at its size
    with pytest.raises(VolumeError, match="do not fit in a 16 MiB volume"):
        plan(["./big:/mnt/d:16"], layout, cwd=tmp_path)


def test_plan_accepts_an_ext4_image_file(tmp_path: Path, layout: Layout) -> None:
    _mkext4(tmp_path / "disk.img", 16)
    (p,) = plan(["./disk.img:/mnt/d:16"], layout, cwd=tmp_path)
    assert p.kind == "image" and p.meta is None
    with pytest.raises(VolumeError, match="is 16 MiB; shrinking it to 8 MiB is refused"):
        plan(["./disk.img:/mnt/d:8"], layout, cwd=tmp_path)


# --- ext4 -------------------------------------------------------------------------------


def test_superblock(tmp_path: Path) -> None:
    _mkext4(tmp_path / "a.img", 24)
    sb = ext4.read_superblock(tmp_path / "a.img")
    assert sb is not None and sb.size_bytes == 24 * 1024 * 1024 and sb.has_journal and not sb.needs_recovery
    assert 0 < sb.used_bytes < sb.size_bytes
    (tmp_path / "junk").write_bytes(b"\xff" * 4096)
    assert ext4.read_superblock(tmp_path / "junk") is None
    assert ext4.read_superblock(tmp_path / "missing") is None


def test_format_new_refuses_anything_but_a_blank_new_file(tmp_path: Path) -> None:
    _mkext4(tmp_path / "data.img", 16)
    before = (tmp_path / "data.img").read_bytes()
    with pytest.raises(VolumeError, match="refusing to format"):
        ext4.format_new(tmp_path / "data.img", DEFAULT_RUNNER, label="x", journal=True, root_owner=(0, 0),
                        desc="test")
    assert (tmp_path / "data.img").read_bytes() == before
    with pytest.raises(FileExistsError):
        ext4.create_sparse(tmp_path / "data.img", 1 << 20)


def _stat(image: Path, path: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"stat {ext4.debugfs_quote(path)}", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return " ".join(out.splitlines()[:3])


def test_readonly_image_owners_modes_and_odd_names(tmp_path: Path) -> None:
    src = tmp_path / "cfg"
    (src / "sub dir").mkdir(parents=True)
    (src / "app.json").write_text("{}")
    (src / "app.json").chmod(0o600)
    (src / 'we"ird\\name').write_text("x")
    (src / "sub dir" / "deep.txt").write_text("deep")
    (src / "link").symlink_to("app.json")
    plain = tmp_path / "plain.ext4"
    volumes.build_readonly_image(parse_volume(f"{src}:/mnt/c"), plain, DEFAULT_RUNNER)
    assert "Mode:  0644" in _stat(plain, "/app.json") and "User:     0   Group:     0" in _stat(plain, "/app.json")
    assert "Mode:  0644" in _stat(plain, '/we"ird\\name')
    assert "Mode:  0755" in _stat(plain, "/sub dir")
    listing = subprocess.run(["debugfs", "-R", "ls /", str(plain)], capture_output=True, text=True).stdout
    assert "lost+found" not in listing
    secret = tmp_path / "secret.ext4"
    volumes.build_readonly_image(parse_volume(f"{src}:/run/secrets"), secret, DEFAULT_RUNNER)
    assert "Mode:  0640" in _stat(secret, "/app.json") and "Group:  1000" in _stat(secret, "/app.json")
    assert "Mode:  0750" in _stat(secret, "/") and "Mode:  0750" in _stat(secret, "/sub dir")
    assert "Mode:  0640" in _stat(secret, "/sub dir/deep.txt")


def test_readonly_image_refuses_line_breaks_in_names(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "a\nb").write_text("x")
    with pytest.raises(VolumeError, match="line breaks"):
        volumes.build_readonly_image(parse_volume(f"{tmp_path}/cfg:/mnt/c"), tmp_path / "i.ext4", DEFAULT_RUNNER)


# --- attach, the lock, and undo ----------------------------------------------------------


def _attach(layout: Layout, tmp_path: Path, texts: list[str], undo: ExitStack) -> volumes.Attached:
    files = VMFiles(tmp_path / "vm")
    files.root.mkdir(exist_ok=True)
    planned = plan(texts, layout, cwd=tmp_path)
    return volumes.attach(planned, vm="web", files=files, layout=layout, undo=undo, runner=DEFAULT_RUNNER)


def _booted(a: volumes.Attached) -> None:
    a.held_by(DEAD_PID, None)  # QEMU started (and has exited since)
    a.booted()


def test_failed_up_removes_only_a_volume_no_guest_ran_on(tmp_path: Path, layout: Layout) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "seed.txt").write_text("seed")
    store = VolumeStore(layout)
    vid = volume_id(tmp_path / "data")
    with pytest.raises(RuntimeError), ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./data:/mnt/data:16"], undo)
        assert store.load(vid) is not None and a.boot[0].fresh
        raise RuntimeError("QEMU failed to start")
    assert store.load(vid) is None and store.ids() == []
    assert (tmp_path / "data" / "seed.txt").read_text() == "seed"  # the host dir is never touched

    with pytest.raises(RuntimeError), ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./data:/mnt/data:16"], undo)
        a.held_by(DEAD_PID, None)  # QEMU ran: from here on the volume stays
        raise RuntimeError("the guest never answered")
    meta = store.load(vid)
    assert meta is not None and not meta.guest_owned


def test_mvms_own_image_of_a_volume_is_named_by_its_host_path(tmp_path: Path, layout: Layout) -> None:
    """Its image given as HOST would be a second volume on the same file, its lock another one
    (QEMU's own lock was all that kept a second VM off it)."""
    (tmp_path / "data").mkdir()
    with ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./data:/mnt/data:16"], undo)
        a.held_by(DEAD_PID, None)
        undo.pop_all()
    image = VolumeStore(layout).managed_image(volume_id(tmp_path / "data"))
    with pytest.raises(VolumeError, match="is mvm's own image of a volume") as err:
        plan([f"{image}:/mnt/x:16"], layout, cwd=tmp_path)
    assert err.value.hint == f"name the volume by what it was made for: -v {tmp_path / 'data'}:/mnt/x:SIZE_MB"


def test_a_read_only_mount_of_a_volumes_host_dir_says_the_volume_is_not_mounted(tmp_path: Path,
                                                                                layout: Layout) -> None:
    """`-v ./data:/mnt/data` after `-v ./data:/mnt/data:64` (the size forgotten) showed the
    guest the host dir's files, read-only, and the volume's data looked lost."""
    (tmp_path / "data").mkdir()
    assert volumes.hidden_volumes(plan(["./data:/mnt/data"], layout, cwd=tmp_path), layout) == []
    with ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./data:/mnt/data:64"], undo)
        a.held_by(DEAD_PID, None)
        undo.pop_all()
    vid = volume_id(tmp_path / "data")
    [note] = volumes.hidden_volumes(plan(["./data:/mnt/data"], layout, cwd=tmp_path), layout)
    assert note == (f"{tmp_path / 'data'} -> /mnt/data is a read-only copy of the directory; its persistent volume "
                    f"{vid} (64 MiB, with the data the guest wrote) is not mounted: to mount it, add its size: "
                    f"-v {tmp_path / 'data'}:/mnt/data:64")
    # the same HOST also mounted with its size in this up: the volume is mounted (there)
    assert volumes.hidden_volumes(plan(["./data:/mnt/data:64", "./data:/mnt/ro"], layout, cwd=tmp_path),
                                  layout) == []
    meta = VolumeStore(layout).meta_path(vid)
    meta.write_text("{not json")  # a damaged record: `volume ls` says so; the read-only up goes on
    assert volumes.hidden_volumes(plan(["./data:/mnt/data"], layout, cwd=tmp_path), layout) == []


def test_lock_refuses_a_second_holder_and_names_it(tmp_path: Path, layout: Layout) -> None:
    import os

    store = VolumeStore(layout)
    with ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./data:/mnt/data:16"], undo)
        a.held_by(os.getpid(), None)  # stand-in for QEMU: this process holds the lock
        vid = a.locks[0].volume
        undo.pop_all()
    with pytest.raises(VolumeError) as info:
        plan(["./data:/mnt/data:16"], layout, cwd=tmp_path)
    assert info.value.message.endswith(f"is in use by VM 'web' (QEMU pid {os.getpid()})")
    assert volume_ls(layout=layout)[0].held_by == f"VM 'web' (QEMU pid {os.getpid()})"
    assert "mvmctl down web" in (info.value.hint or "")
    with pytest.raises(VolumeError, match="in use by VM 'web'"):
        store.lock(vid, "data")  # the flock itself, not only holder.json
    with pytest.raises(VolumeError, match="in use by VM 'web'"):
        volume_rm(vid, layout=layout)
    assert volume_ls(layout=layout)[0].vm == "web"
    a.release()  # "QEMU exits"
    store.clear_holder(vid)
    assert volume_ls(layout=layout)[0].vm is None
    volume_rm(vid, layout=layout)
    assert store.ids() == [] and not store.lock_path(vid).exists()


def test_grow_keeps_data_and_shrink_is_refused(tmp_path: Path, layout: Layout) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("keep me")
    with ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./data:/mnt/data:16"], undo)
        a.held_by(DEAD_PID, None)
        a.booted()
        undo.pop_all()
    image = Path(VolumeStore(layout).managed_image(volume_id(tmp_path / "data")))
    uuid = ext4.read_superblock(image).uuid  # type: ignore[union-attr]
    with ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./data:/mnt/data:40"], undo)
        assert not a.boot[0].fresh  # the first boot already handed the files over
        a.held_by(DEAD_PID, None)
        a.booted()
        undo.pop_all()
    sb = ext4.read_superblock(image)
    assert sb is not None and sb.size_bytes == 40 << 20 and image.stat().st_size == 40 << 20
    assert sb.uuid == uuid  # the same filesystem, grown, not a new one
    out = subprocess.run(["debugfs", "-R", "cat /keep.txt", str(image)], capture_output=True, text=True).stdout
    assert out == "keep me"
    with pytest.raises(VolumeError, match="is 40 MiB; shrinking it to 16 MiB is refused"):
        plan(["./data:/mnt/data:16"], layout, cwd=tmp_path)


def test_lost_image_is_never_silently_recreated(tmp_path: Path, layout: Layout) -> None:
    with ExitStack() as undo:
        _booted(_attach(layout, tmp_path, ["./data:/mnt/data:16"], undo))
        undo.pop_all()
    VolumeStore(layout).managed_image(volume_id(tmp_path / "data")).unlink()
    with pytest.raises(VolumeError, match="its image .* is missing"):
        plan(["./data:/mnt/data:16"], layout, cwd=tmp_path)


# --- export -------------------------------------------------------------------------------


def _guest_writes(image: Path, name: str, content: str, tmp_path: Path) -> None:
    """Change a file inside the (unmounted) volume, as a guest would have."""
    src = tmp_path / "guest-write"
    src.write_text(content)
    subprocess.run(["debugfs", "-w", "-R", f"rm {name}", str(image)], capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", f"write {src} {name}", str(image)], check=True, capture_output=True)


def test_export_merges_three_ways_and_never_loses_a_host_edit(tmp_path: Path, layout: Layout) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("guest-edits", "host-edits", "both-edit", "untouched"):
        (data / name).write_text("v1")
    with ExitStack() as undo:
        _booted(_attach(layout, tmp_path, ["./data:/mnt/data:16"], undo))
        undo.pop_all()
    vid = volume_id(data)
    image = VolumeStore(layout).managed_image(vid)
    _guest_writes(image, "guest-edits", "guest", tmp_path)
    _guest_writes(image, "both-edit", "guest", tmp_path)
    _guest_writes(image, "new-in-guest", "new", tmp_path)
    (data / "host-edits").write_text("host")
    (data / "both-edit").write_text("host")
    (data / "host-only").write_text("mine")

    with pytest.raises(VolumeError) as info:
        volume_export(str(data), layout=layout)
    assert "nothing was written" in info.value.message
    assert "both-edit: changed both on the host and in the volume" in (info.value.output or "")
    assert (data / "guest-edits").read_text() == "v1" and not (data / "new-in-guest").exists()
    # what `volume export --json` prints then (a script gets the list, not only the message)
    assert isinstance(info.value, ExportConflicts) and info.value.volume == volume_id(data)
    assert info.value.conflicts == ["both-edit: changed both on the host and in the volume"]

    (data / "both-edit").write_text("v1")  # the user reverts their edit: no conflict any more
    result = volume_export(str(data), layout=layout)
    assert sorted(result.updated) == ["both-edit", "guest-edits"]
    assert result.new == ["new-in-guest"] and result.kept == ["host-edits"]
    assert result.unchanged == ["untouched"] and result.host_only == ["host-only"]
    assert {p.name: p.read_text() for p in data.iterdir()} == {
        "guest-edits": "guest", "host-edits": "host", "both-edit": "guest", "untouched": "v1",
        "new-in-guest": "new", "host-only": "mine"}

    _guest_writes(image, "host-edits", "guest again", tmp_path)  # now both sides changed it
    with pytest.raises(VolumeError):
        volume_export(vid, layout=layout)
    forced = volume_export(vid, layout=layout, force=True)
    assert forced.overwritten == ["host-edits"] and (data / "host-edits").read_text() == "guest again"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "untouched").write_text("someone else's")  # there before any copy
    with pytest.raises(ExportConflicts) as elsewhere:
        volume_export(vid, to=tmp_path / "other", layout=layout)
    assert elsewhere.value.conflicts == ["untouched: already on the host, and different from the volume's"]
    copy = volume_export(vid, to=tmp_path / "copy", layout=layout)
    assert sorted(copy.new) == sorted(["both-edit", "guest-edits", "host-edits", "new-in-guest", "untouched"])
    assert not list(tmp_path.rglob(".mvm-export-*")), "the export's staging dir was left behind"


def test_ls_shows_a_broken_volume_instead_of_failing(tmp_path: Path, layout: Layout) -> None:
    with ExitStack() as undo:
        _booted(_attach(layout, tmp_path, ["./a:/mnt/a:16", "./b:/mnt/b:16"], undo))
        undo.pop_all()
    store = VolumeStore(layout)
    store.meta_path(volume_id(tmp_path / "a")).write_text("{not json")
    rows = {row.name: row for row in volume_ls(layout=layout)}
    assert "unreadable" in (rows[volume_id(tmp_path / "a")].error or "")
    assert rows[volume_id(tmp_path / "b")].size_mb == 16


def test_an_image_file_is_used_in_place_and_never_deleted(tmp_path: Path, layout: Layout) -> None:
    _mkext4(tmp_path / "disk.img", 16)
    uuid = ext4.read_superblock(tmp_path / "disk.img").uuid  # type: ignore[union-attr]
    store = VolumeStore(layout)
    with pytest.raises(RuntimeError), ExitStack() as undo:
        a = _attach(layout, tmp_path, ["./disk.img:/mnt/d:24"], undo)
        assert a.disks[0].path == tmp_path / "disk.img" and not a.boot[0].fresh
        a.held_by(DEAD_PID, None)
        raise RuntimeError("the guest never answered")
    assert store.ids() == []  # only metadata was made, and it went
    sb = ext4.read_superblock(tmp_path / "disk.img")
    assert sb is not None and sb.uuid == uuid and sb.size_bytes == 24 << 20  # grown, not reformatted
    with ExitStack() as undo:
        _booted(_attach(layout, tmp_path, ["./disk.img:/mnt/d:24"], undo))
        undo.pop_all()
    (row,) = volume_ls(layout=layout)
    assert row.kind == "image" and row.image == str(tmp_path / "disk.img")
    with pytest.raises(VolumeError, match="no host dir to export into"):
        volume_export(row.name, layout=layout)
    volume_rm(str(tmp_path / "disk.img"), layout=layout)
    assert store.ids() == [] and (tmp_path / "disk.img").is_file()


def test_volume_rm_of_several_removes_the_free_ones_and_lists_them(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`volume rm --json a b` with b in use: a is removed and listed, b reported, exit 1 (it
    removed a and printed nothing, so a script could not tell a was gone)."""
    import json
    import signal

    import mvm
    from mvm.cli import app

    def info(name: str) -> mvm.VolumeInfo:
        return mvm.VolumeInfo(name=name, host=f"/data/{name}", kind="managed", image=f"/v/{name}.ext4",
                              exists=True, size_mb=64, used_mb=1, allocated_mb=2)

    def rm(name: str) -> mvm.VolumeInfo:
        if name == "held":
            raise mvm.StateError(f"volume {name} is in use by VM 'data'")
        return info(name)

    monkeypatch.setattr(mvm, "volume_info", info)
    monkeypatch.setattr(mvm, "volume_rm", rm)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exited:
            app.main(["volume", "rm", "--yes", "--json", "held", "free"])
    finally:
        for sig, handler in handlers.items():  # main() installs the CLI's own
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    assert exited.value.code == 1 and "in use by VM 'data'" in err, err
    assert [row["name"] for row in json.loads(out)] == ["free"]
