"""The Debian builder's pieces that need no mmdebstrap: apt sources, image keys, assembly
(real debugfs on a small real ext4 image standing in for a package layer)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from mvm import _ext4 as ext4
from mvm._proc import DEFAULT_RUNNER
from mvm.builders import aptsources
from mvm.builders.assemble import assemble
from mvm.builders.debian import image_key
from mvm.builders.layer import Layer, layer_key, miss_reason
from mvm.spec import GuestSpec, Service


def test_host_sources_follow_the_hosts_apt(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# company mirror\n"
        "deb [arch=amd64] http://mirror.corp/debian/ bookworm main contrib\n"
        "deb-src http://mirror.corp/debian bookworm main\n"
        "deb http://mirror.corp/debian trixie main\n")
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.corp/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n")
    sources = aptsources.host_sources("bookworm", apt=apt)
    assert sources.mirrors == ["deb http://mirror.corp/debian bookworm main",
                               "deb http://mirror.corp/debian-security bookworm-security main"]
    assert sources.primary == "http://mirror.corp/debian"
    empty = tmp_path / "empty"
    (empty / "sources.list.d").mkdir(parents=True)
    assert aptsources.host_sources("bookworm", apt=empty).mirrors == ["deb http://deb.debian.org/debian bookworm main"]


def test_layer_and_image_keys() -> None:
    s = aptsources.AptSources("bookworm", ["deb http://deb.debian.org/debian bookworm main"])
    assert layer_key(["curl", "python3"], "amd64", s) == layer_key(["python3", "curl", "curl"], "amd64", s)
    assert layer_key(["curl"], "amd64", s) != layer_key(["curl"], "arm64", s)
    spec = GuestSpec(name="a", services={"web": Service(command="true")})
    layer = Layer(Path("/x"), "k", "id1")
    base = Path("/nonexistent")
    newer = Layer(Path("/x"), "k", "id2")  # the same layer key, pulled: newer packages
    assert image_key(spec, base, "6.1", layer) != image_key(spec, base, "6.1", newer)


def test_a_layer_missed_for_the_same_packages_says_why(tmp_path: Path) -> None:
    """A second install of the same packages (a minute or more under emulation) names its
    cause: a cached layer of another mvm version or other apt sources; a first one is silent."""
    s = aptsources.AptSources("bookworm", ["deb http://deb.debian.org/debian bookworm main"])
    wanted = ["python3", "curl"]
    key = layer_key(wanted, "arm64", s)
    assert miss_reason(tmp_path, key, wanted, "arm64", s) is None

    def cached(name: str, **doc: object) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "layer.json").write_text(json.dumps(
            {"packages": wanted, "arch": "arm64", "suite": "bookworm", "mirrors": s.mirrors} | doc))

    cached("other-arch", arch="amd64")
    cached(key)  # this key's own, image missing: not a reason
    assert miss_reason(tmp_path, key, wanted, "arm64", s) is None
    cached("older-mvm", agent="0" * 64, packages=["curl", "python3"])
    assert "another version of mvm" in (miss_reason(tmp_path, key, wanted, "arm64", s) or "")
    other = aptsources.AptSources("trixie", ["deb http://deb.debian.org/debian trixie main"])
    why = miss_reason(tmp_path, layer_key(wanted, "arm64", other), wanted, "arm64", other) or ""
    assert "other apt sources (Debian bookworm)" in why and "from trixie" in why


def _fake_layer(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "home").mkdir()
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc" / "group").write_text("root:x:0:\n")
    image = tmp_path / "rootfs.ext4"
    ext4.create_sparse(image, 16 * ext4.MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-T", "default", "-O", "^has_journal", "-E", "root_owner=0:0",
                    "-d", str(tree), str(image)], check=True, capture_output=True)
    return image


def test_assembly_writes_the_guests_parts(tmp_path: Path) -> None:
    image = _fake_layer(tmp_path)
    app = tmp_path / "app"
    (app / "static" / "img").mkdir(parents=True)
    (app / "server.py").write_text("print('hi')\n")
    os.chmod(app / "server.py", 0o755)
    (app / "static" / "img" / "a b.txt").write_text("spaced\n")
    os.symlink("server.py", app / "link")
    spec = GuestSpec.model_validate({
        "name": "web", "services": {"web": {"command": "true"}, "db": {"command": "true", "user": "pg"}},
        "files": {"/app": "app", "/etc/motd": "app/server.py"},
    })
    assemble(image, spec, spec.guest_json(frontend="toml"), base=tmp_path, runner=DEFAULT_RUNNER)

    def cat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {ext4.debugfs_quote(path)}", str(image)], capture_output=True,
                              text=True).stdout

    def stat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"stat {ext4.debugfs_quote(path)}", str(image)],
                              capture_output=True, text=True).stdout

    assert cat("/etc/passwd").splitlines()[1:] == [
        "mvm:x:1000:1000:mvm service user:/home/mvm:/bin/sh", "pg:x:1001:1001:mvm service user:/home/pg:/bin/sh"]
    assert "mvm:x:1000:pg" in cat("/etc/group") and "Mode:  0640" in stat("/etc/shadow")
    assert '"name": "web"' in cat("/etc/mvm/guest.json")
    assert "Mode:  0755" in stat("/app/server.py") and "User:     0" in stat("/app/server.py")
    assert cat("/app/static/img/a b.txt") == "spaced\n"
    assert "Type: symlink" in stat("/app/link") and cat("/etc/motd") == "print('hi')\n"
    assert "User:  1001" in stat("/home/pg") and "Mode:  0750" in stat("/home/pg")
    out = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_name_with_a_line_break_is_refused_with_the_file_named(tmp_path: Path) -> None:
    """debugfs reads its commands as lines: such a name crashed the build as a bug (exit 3)."""
    import pytest
    from pydantic import ValidationError

    from mvm.errors import BuildError

    with pytest.raises(ValidationError, match="cannot hold a line break"):
        GuestSpec.model_validate({"name": "web", "files": {"/etc/a\nb": "app"}})
    image = _fake_layer(tmp_path)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "bad\nname").write_text("x")
    spec = GuestSpec.model_validate({"name": "web", "files": {"/app": "app"}})
    with pytest.raises(BuildError, match="files: '/app' = 'app': .*line break") as caught:
        assemble(image, spec, spec.guest_json(frontend="toml"), base=tmp_path, runner=DEFAULT_RUNNER)
    assert caught.value.hint and "rename the file" in caught.value.hint
