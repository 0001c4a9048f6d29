"""Issue 4: volumes on real VMs.

Read-only config and secrets, persistent sized data volumes that survive `down`, `kill -9`
and growing, the one-VM-at-a-time lock, export back to the host, and every bad input.
All boots use examples/config-app (built once per session): five boots in all.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLI, EXAMPLES, free_port, http_get, qemu_pids_under, wait_for

APP = str(EXAMPLES / "config-app")
# Writes 256 KiB of random data, fsyncs the file and its directory, prints the sha256.
WRITE = (
    "import hashlib, os, sys\n"
    "data = os.urandom(256 * 1024)\n"
    "with open(sys.argv[1], 'wb') as f:\n"
    "    f.write(data); f.flush(); os.fsync(f.fileno())\n"
    "fd = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY); os.fsync(fd)\n"
    "print(hashlib.sha256(data).hexdigest())\n"
)


@pytest.fixture(scope="session")
def config_image(cli: CLI) -> dict[str, Any]:
    return cli.json("build", APP)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _vm(cli: CLI, name: str) -> dict[str, Any]:
    return next(row for row in cli.json("ls") if row["name"] == name)


def _sha256(cli: CLI, vm: str, path: str) -> str:
    return cli("exec", vm, "--", "sha256sum", path).stdout.split()[0]


def _df_mb(cli: CLI, vm: str, path: str) -> int:
    return int(cli("exec", vm, "--", "df", "-m", path).stdout.splitlines()[1].split()[1])


def _mount_opts(cli: CLI, vm: str) -> dict[str, str]:
    mounts = cli("exec", vm, "--", "cat", "/proc/mounts").stdout
    return {f[1]: f[3] for f in (ln.split() for ln in mounts.splitlines())}


def _config_dir(root: Path) -> Path:
    cfg = root / "config"
    (cfg / "sub").mkdir(parents=True)
    (cfg / "app.json").write_text(json.dumps({"greeting": "hello from the host", "answer": 42}))
    (cfg / "app.json").chmod(0o600)  # private on the host; the service must still read it
    (cfg / "sub" / "nested.txt").write_text("nested\n")
    return cfg


def test_config_secrets_env_and_an_image_file(cli: CLI, config_image: dict[str, Any], tmp_path: Path,
                                              no_leaks: None) -> None:
    cfg = _config_dir(tmp_path)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("s3cret\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "key").write_text("k3y\n")
    seed = tmp_path / "img-seed"
    seed.mkdir()
    (seed / "hello.txt").write_text("from an image file\n")
    image = tmp_path / "disk.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-T", "default", "-d", str(seed), str(image), "16M"], check=True)
    port = free_port()
    up = cli("up", APP, "--name", "cfg", "-p", f"{port}:8080", "-e", "GREETING=set with -e",
             "-v", f"{cfg}:/mnt/config", "-v", f"{secrets}:/run/secrets", "-v", f"{creds}:/opt/creds:secret",
             "-v", f"{image}:/srv/img:32", "--wait")
    try:
        assert f"{cfg} -> guest /mnt/config (ro)" in up.stdout
        assert f"{secrets} -> guest /run/secrets (secret)" in up.stdout
        # the service reads CONFIG_PATH=/mnt/config/app.json and serves it
        assert json.loads(http_get(port, "/")) == {"greeting": "hello from the host", "answer": 42}
        env = json.loads(http_get(port, "/env"))
        assert env == {"CONFIG_PATH": "/mnt/config/app.json", "GREETING": "set with -e", "user": "mvm",
                       "prestart": "CONFIG_PATH=/mnt/config/app.json GREETING=set with -e\n"}

        opts = _mount_opts(cli, "cfg")
        for ro in ("/mnt/config", "/run/secrets", "/opt/creds"):
            assert {"ro", "nosuid", "nodev", "noexec"} <= set(opts[ro].split(",")), (ro, opts[ro])
        assert {"rw", "nosuid", "nodev"} <= set(opts["/srv/img"].split(","))
        for argv in (["sh", "-c", "echo x > /mnt/config/new"], ["touch", "/mnt/config/sub/x"],
                     ["rm", "/mnt/config/app.json"]):
            r = cli("exec", "cfg", "--", *argv, check=False)
            assert r.returncode != 0 and "Read-only file system" in r.stderr, (argv, r.stderr)
        r = cli("exec", "cfg", "-u", "root", "--", "sh", "-c", "echo x > /mnt/config/new", check=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr  # not even root

        assert cli("exec", "cfg", "-u", "mvm", "--", "cat", "/mnt/config/sub/nested.txt").stdout == "nested\n"
        assert cli("exec", "cfg", "-u", "nobody", "--", "cat", "/mnt/config/app.json").returncode == 0
        for path, content in (("/run/secrets/token", "s3cret\n"), ("/opt/creds/key", "k3y\n")):
            assert cli("exec", "cfg", "-u", "mvm", "--", "cat", path).stdout == content
            r = cli("exec", "cfg", "-u", "nobody", "--", "cat", path, check=False)
            assert r.returncode != 0 and "Permission denied" in r.stderr, path
            r = cli("exec", "cfg", "-u", "nobody", "--", "ls", os.path.dirname(path), check=False)
            assert r.returncode != 0, path

        # an existing ext4 image file as HOST: used in place, grown to the size asked for
        assert cli("exec", "cfg", "--", "cat", "/srv/img/hello.txt").stdout == "from an image file\n"
        cli("exec", "cfg", "-u", "mvm", "--", "sh", "-c", "echo written > /srv/img/new.txt && sync")
        assert 16 < _df_mb(cli, "cfg", "/srv/img") <= 32

        # a VM of another MVM_HOME cannot open the same image file either: QEMU's own lock
        home2 = tmp_path / "home2"
        r = cli("up", APP, "--name", "cfg2", "-v", f"{cfg}:/mnt/config", "-v", f"{image}:/srv/img:32",
                env={"MVM_HOME": str(home2)}, check=False)
        assert r.returncode == 1
        assert "a volume image is in use by another process" in _error_line(r.stderr)
        assert "Failed to get \"write\" lock" in r.stderr
        vms = home2 / "state" / "vms"
        assert not qemu_pids_under(home2) and not [p for p in vms.iterdir() if p.name != ".locks"]
        assert not (home2 / "state" / "volumes").exists() or not list((home2 / "state" / "volumes").iterdir())
    finally:
        cli("down", "cfg")
    assert image.stat().st_size == 32 << 20
    out = subprocess.run(["debugfs", "-R", "cat /new.txt", str(image)], capture_output=True, text=True).stdout
    assert out == "written\n"
    assert json.loads((cfg / "app.json").read_text())["answer"] == 42
    assert sorted(p.name for p in cfg.iterdir()) == ["app.json", "sub"]  # the host dirs are not touched


def test_data_survives_down_kill_and_growth(cli: CLI, config_image: dict[str, Any], tmp_path: Path,
                                           no_leaks: None) -> None:
    cfg = _config_dir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "seed.txt").write_text("from the host\n")

    def up(size: int, name: str = "data", check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli("up", APP, "--name", name, "-v", f"{cfg}:/mnt/config", "-v", f"{data}:/mnt/data:{size}",
                   check=check)

    def write(path: str) -> str:
        return cli("exec", "data", "-u", "mvm", "--", "python3", "-c", WRITE, path).stdout.strip()

    up(64)
    try:
        # created from the host dir's files, handed to the service user
        assert cli("exec", "data", "--", "cat", "/mnt/data/seed.txt").stdout == "from the host\n"
        assert cli("exec", "data", "--", "stat", "-c", "%U", "/mnt/data", "/mnt/data/seed.txt",
                   "/mnt/data/logs").stdout.split() == ["mvm", "mvm", "mvm"]
        df64 = _df_mb(cli, "data", "/mnt/data")
        first = write("/mnt/data/first.bin")

        # a copy that does not fit says so, at once, and the next command gets its own answer
        big = tmp_path / "big.bin"
        with open(big, "wb") as f:
            f.truncate(80 << 20)
        listing = cli("exec", "data", "--", "ls", "-A", "/mnt/data").stdout
        r = cli("cp", str(big), "data:/mnt/data/first.bin", check=False)
        assert r.returncode == 1, r.stderr
        assert "/mnt/data/first.bin: No space left on device (the file system there is full)" in r.stderr, r.stderr
        # ... and loses nothing: the file it was to replace is whole, no part of the new one left
        assert _sha256(cli, "data", "/mnt/data/first.bin") == first
        assert cli("exec", "data", "--", "ls", "-A", "/mnt/data").stdout == listing
        assert cli("exec", "data", "--", "echo", "still answers").stdout == "still answers\n"

        # one VM at a time: a second VM asking for the same volume is refused
        r = up(64, name="other", check=False)
        assert r.returncode == 1
        assert "is in use by VM 'data' (QEMU pid" in _error_line(r.stderr)
        assert "mvmctl down data" in r.stderr
        assert not (cli.vms / "other").exists()
        r = cli("volume", "rm", "--yes", str(data), check=False)
        assert r.returncode == 1 and "is in use by VM 'data'" in _error_line(r.stderr)
        r = cli("volume", "export", str(data), check=False)
        assert r.returncode == 1 and "is in use by VM 'data'" in _error_line(r.stderr)

        (row,) = [v for v in cli.json("volume", "ls") if v["host"] == str(data)]
        assert (row["vm"], row["size_mb"], row["last_guest"], row["kind"]) == ("data", 64, "/mnt/data", "managed")
        assert row["image"].startswith(str(cli.home / "state" / "volumes"))
        assert row["used_mb"] > 0 and row["allocated_mb"] < 64  # sparse
        assert Path(row["image"]).stat().st_size == 64 << 20  # exactly SIZE_MB
        table = cli("volume", "ls").stdout
        assert row["name"] in table and "64 MiB" in table and str(data) in table
    finally:
        cli("down", "data")
    image = Path(row["image"])
    assert image.is_file(), "down must never touch a volume"

    up(64)
    try:
        assert _sha256(cli, "data", "/mnt/data/first.bin") == first
        second = write("/mnt/data/second.bin")
        pid = _vm(cli, "data")["pid"]
        os.kill(pid, signal.SIGKILL)  # after the guest's fsync
        wait_for(lambda: _vm(cli, "data")["status"] == "crashed", 10, "the VM to show as crashed")
    finally:
        cli("down", "data")

    up(128)  # bigger: grown in place, nothing lost
    try:
        assert _sha256(cli, "data", "/mnt/data/first.bin") == first
        assert _sha256(cli, "data", "/mnt/data/second.bin") == second
        df128 = _df_mb(cli, "data", "/mnt/data")
        assert df64 < 64 < df128 <= 128, (df64, df128)
    finally:
        cli("down", "data")
    assert image.stat().st_size == 128 << 20
    (after,) = [v for v in cli.json("volume", "ls") if v["host"] == str(data)]
    assert after["fs_uuid"] == row["fs_uuid"] and after["size_mb"] == 128  # grown, never reformatted

    r = up(100, check=False)  # shrinking is refused, and changes nothing
    assert r.returncode == 1
    assert "is 128 MiB; shrinking it to 100 MiB is refused" in _error_line(r.stderr)
    assert image.stat().st_size == 128 << 20 and not (cli.vms / "data").exists()

    # the data reaches the host with `volume export`, into the dir the volume came from
    (data / "seed.txt").write_text("edited on the host\n")
    result = json.loads(cli("volume", "export", str(data), "--json").stdout)
    assert sorted(result["new"]) == ["first.bin", "logs/", "second.bin"] and result["kept"] == ["seed.txt"]
    assert hashlib.sha256((data / "first.bin").read_bytes()).hexdigest() == first
    assert hashlib.sha256((data / "second.bin").read_bytes()).hexdigest() == second
    assert (data / "seed.txt").read_text() == "edited on the host\n"  # the user's edit is never overwritten

    r = cli("volume", "rm", str(data), check=False, input="")
    assert r.returncode == 1 and "pass --yes" in r.stderr and image.exists()
    cli("volume", "rm", "--yes", str(data))
    assert not image.exists() and (data / "first.bin").exists()


@pytest.mark.parametrize(
    ("volumes", "fragment"),
    [
        (["{tmp}/missing:/mnt/config"], "HOSTDIR {tmp}/missing does not exist"),
        (["{cfg}:mnt/config"], "guest path 'mnt/config' is not absolute"),
        (["{cfg}:/"], "guest path / is reserved"),
        (["{cfg}:/proc"], "guest path /proc is reserved"),
        (["{cfg}:/sys"], "guest path /sys is reserved"),
        (["{cfg}:/dev"], "guest path /dev is reserved"),
        (["{cfg}:/mnt/config", "{tmp}/other:/mnt/config"], "two volumes on one guest path /mnt/config"),
        (["{tmp}/data:/mnt/data:0"], "size 0 MiB: a volume's size must be a positive number of MiB"),
        (["{tmp}/data:/mnt/data:-64"], "size -64 MiB: a volume's size must be a positive number of MiB"),
        (["{tmp}/data:/mnt/data:big"], "'big' is neither a size in MiB nor 'ro' or 'secret'"),
        (["{tmp}/notes.txt:/mnt/data:64"], "{tmp}/notes.txt is an existing file but not an ext4 image"),
    ],
    ids=["missing-hostdir", "relative-guest-path", "root", "proc", "sys", "dev", "same-guest-path",
         "size-zero", "size-negative", "size-not-a-number", "file-not-ext4"],
)
def test_bad_volume_input(cli: CLI, tmp_path: Path, volumes: list[str], fragment: str, no_leaks: None) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "app.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "notes.txt").write_text("just notes\n")
    store = cli.home / "state" / "volumes"

    def snapshot() -> dict[str, bytes | None]:
        tree = {str(p): (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")}
        return tree | {str(p): None for p in (store.iterdir() if store.exists() else [])}

    before = snapshot()
    args = [a for v in volumes for a in ("-v", v.format(tmp=tmp_path, cfg=cfg))]
    r = cli("up", APP, "--name", "badvol", *args, check=False)
    assert r.returncode == 1, r.stderr
    assert fragment.format(tmp=tmp_path) in _error_line(r.stderr)
    assert "hint:" in r.stderr
    assert snapshot() == before, "a refused -v created or changed something"
    assert not (cli.vms / "badvol").exists()
