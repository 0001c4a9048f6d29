import os
import re
from pathlib import Path

import pytest

from mvm.errors import SpecError
from mvm.spec import GuestSpec, load_toml, parse_spec

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_hello_example_matches_the_seed() -> None:
    spec = load_toml(EXAMPLES / "hello")
    assert spec.name == "hello"
    assert spec.packages == ["python3", "curl"]
    svc = spec.services["hello"]
    assert "mkdir -p /tmp/www" in svc.pre_start
    assert svc.command == "python3 -m http.server 8080 --directory /tmp/www"
    assert svc.user == "mvm" and svc.restart == "always"
    check = spec.health_checks["hello"]
    assert check.health_cmd == "curl -sf http://localhost:8080/"
    assert check.health_interval_secs == 5
    doc = spec.guest_json(frontend="toml")
    assert doc["schema_version"] == 1
    assert doc["services"]["hello"]["preStart"].startswith("mkdir")
    assert doc["healthChecks"]["hello"]["healthCmd"].startswith("curl")


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_text('name = "x"\n[services.web]\ncomand = "true"\n')
    with pytest.raises(SpecError) as err:
        load_toml(tmp_path)
    msg = err.value.message
    assert str(tmp_path / "mvm.toml") in msg
    # the misspelt key leads, not the "missing" right spelling it also causes
    assert msg.startswith(f"{tmp_path / 'mvm.toml'}: services.web.comand: unknown key (did you mean 'command'?)")


def test_service_without_command() -> None:
    with pytest.raises(SpecError, match=r"services\.web\.command: required key is missing"):
        parse_spec({"name": "x", "services": {"web": {"preStart": "true"}}}, source="t")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"name": "Bad_Name"}, "not a valid VM name"),
        ({"name": "x", "packages": ["Not Valid"]}, "not a valid Debian package name"),
        ({"name": "x", "services": {"a": {"command": "x", "env": {"1BAD": "v"}}}}, "not a valid environment"),
        ({"name": "x", "services": {"a": {"command": "x", "restart": "sometimes"}}}, "restart"),
        ({"name": "x", "services": {"a": {"command": "x", "dependsOn": ["b"]}}}, "unknown service 'b'"),
        ({"name": "x", "services": {"a": {"command": "x", "dependsOn": ["b"]},
                                    "b": {"command": "y", "dependsOn": ["c"]},
                                    "c": {"command": "z", "dependsOn": ["a"]}}}, r"^t: .*loop \(a -> b -> c -> a\)"),
        ({"name": "x", "services": {"a": {"command": "x", "dependsOn": ["a"]}}}, r"loop \(a -> a\)"),
        ({"name": "x", "healthChecks": {"a": {"healthCmd": "x", "healthIntervalSecs": 0}}},
         "healthChecks.a.healthIntervalSecs: must be more than 0, not 0$"),
        ({"name": "x", "memory": 1}, "memory: must be at least 128 MiB, not 1$"),
        ({"name": "x", "cpus": 65}, "cpus: must be at most 64, not 65$"),
        ({"name": "x", "services": {"a": {"command": ""}}}, "services.a.command: must not be empty$"),
    ],
)
def test_invalid_values_are_named(data: dict, fragment: str) -> None:
    with pytest.raises(SpecError, match="(?m)" + fragment):  # $: the message's end (its hint is a note below)
        parse_spec(data, source="t")


def test_bad_toml_syntax(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_text("name = \n")
    with pytest.raises(SpecError, match="not valid TOML") as bad:
        load_toml(tmp_path)
    assert "strings need quotes" in (bad.value.hint or "")  # every mvm error has a hint


def test_a_spec_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_bytes(b'name = "x"\n# caf\xe9\n')
    with pytest.raises(SpecError, match=r"(?m)mvm.toml: not UTF-8 text \(byte 0xe9 on line 2\)$"):
        load_toml(tmp_path)


def test_files_that_are_not_files_or_directories_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # reading it would hang the build
    (tmp_path / "mvm.toml").write_text('name = "x"\nfiles = { "/app/p" = "pipe" }\n')
    with pytest.raises(SpecError, match="files.'/app/p': 'pipe' is not a regular file or a directory"):
        load_toml(tmp_path)
    (tmp_path / "site" / "deep").mkdir(parents=True)
    (tmp_path / "site" / "index.html").write_text("hi")
    (tmp_path / "site" / "link").symlink_to("index.html")
    (tmp_path / "mvm.toml").write_text('name = "x"\nfiles = { "/srv" = "site" }\n')
    assert load_toml(tmp_path).files == {"/srv": "site"}  # files, directories and links are fine
    os.mkfifo(tmp_path / "site" / "deep" / "pipe")  # and one inside a directory is found too
    with pytest.raises(SpecError, match="site/deep/pipe is not a regular file, directory or symlink"):
        load_toml(tmp_path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=f"(?m)no mvm.toml in {tmp_path}$"):
        load_toml(tmp_path)
    with pytest.raises(SpecError, match=f"{tmp_path / 'nosuch'} does not exist"):
        load_toml(tmp_path / "nosuch")


def test_a_dependency_chain_without_a_loop_is_accepted() -> None:
    spec = parse_spec({"name": "x", "services": {"a": {"command": "x", "dependsOn": ["b", "c"]},
                                                 "b": {"command": "y", "dependsOn": ["c"]}, "c": {"command": "z"}}},
                      source="t")
    assert spec.services["a"].depends_on == ["b", "c"]


def test_digest_changes_with_content() -> None:
    a = parse_spec({"name": "x", "packages": ["curl"]}, source="t")
    b = parse_spec({"name": "x", "packages": ["wget"]}, source="t")
    assert a.digest() != b.digest()
    assert a.digest() == parse_spec({"name": "x", "packages": ["curl"]}, source="t").digest()


@pytest.mark.parametrize(
    "data",
    [
        {"name": "hello\n"},
        {"name": "x", "packages": ["curl\n"]},
        {"name": "x", "services": {"a\n": {"command": "x"}}},
        {"name": "x", "services": {"a": {"command": "x", "user": "bob\n"}}},
        {"name": "x", "services": {"a": {"command": "x", "env": {"K\n": "v"}}}},
    ],
)
def test_a_trailing_newline_is_not_a_valid_name(data: dict) -> None:
    with pytest.raises(SpecError):
        parse_spec(data, source="t")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "cpus": "2"}, "cpus: must be a whole number, not str '2' (remove the quotes)"),
        ({"name": "x", "services": {"a": {"command": "x", "env": {"DEBUG": True}}}},
         "services.a.env.DEBUG: must be a string (quote it), not bool True"),
        ({"name": "x", "services": {"a": {"command": ["python3", "-m", "http.server"]}}},
         "services.a.command: must be a string: one command line, run by sh -c (join the words with spaces), "
         "not list ['python3', '-m', 'http.server']"),
        ({"name": "x", "packages": "curl"}, "packages: must be a list, not str 'curl'"),
        ({"name": "x", "arch": "arm64"}, "arch: must be 'x86_64' or 'aarch64', not 'arm64' (did you mean 'aarch64'?)"),
        ({"name": "x", "services": {"a": {"command": "x", "restart": "on_failure"}}},
         "services.a.restart: must be 'always', 'on-failure' or 'no', not 'on_failure' (did you mean 'on-failure'?)"),
        ({"name": "x", "cpus": "two"}, "cpus: must be a whole number, not str 'two'"),
        ({"name": "x", "healthChecks": {"a": {"healthCmd": "x", "healthIntervalSecs": "30s"}}},
         "healthChecks.a.healthIntervalSecs: must be a number, not str '30s'"),
        ({"name": "x", "healthChecks": {"a": {"healthCmd": "x", "healthIntervalSecs": "0.5"}}},
         "healthChecks.a.healthIntervalSecs: must be a number, not str '0.5' (remove the quotes)"),
    ],
)
def test_values_of_the_wrong_type_are_refused_alike(data: dict, message: str) -> None:
    """No coercion: a quoted number is as wrong as an unquoted string, and the message says which."""
    with pytest.raises(SpecError) as err:
        parse_spec(data, source="t")
    assert err.value.message == f"t: {message}"


def test_a_stored_image_with_an_older_hostname_still_reads(tmp_path: Path) -> None:
    """The hostname rule is for specs coming in: an image built before it (`my_host`) stays
    readable (it was listed as broken, and `cleanup` deleted it under its VMs)."""
    from mvm.builders.store import ImageStore, Manifest, read_manifest

    with pytest.raises(SpecError, match="not a valid hostname"):
        parse_spec({"name": "x", "hostname": "my_host"}, source="t")
    store = ImageStore(tmp_path)

    def make(staging: Path) -> Manifest:
        (staging / "rootfs.ext4").write_bytes(b"x")
        return Manifest(key="k" * 32, name="x", frontend="toml", source={},
                        guest=GuestSpec.model_validate({"name": "x", "hostname": "my_host"}))

    image = store.publish("k" * 32, make)
    assert read_manifest(image.path).guest.hostname == "my_host"


def test_each_problem_is_said_once_on_its_own_line() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "x", "cpus": 0, "services": {"a": {"comand": "x"}}}, source="t")
    # the misspelt key first, and not again as its right spelling "missing"
    assert err.value.message == "t: services.a.comand: unknown key (did you mean 'command'?) (and 1 more, below)"
    assert err.value.output == "cpus: must be at least 1, not 0"


def test_env_numbers_are_strings_as_in_mkguest() -> None:
    spec = parse_spec({"name": "x", "services": {"a": {"command": "x", "env": {"PORT": 8080}}}}, source="t")
    assert spec.services["a"].env == {"PORT": "8080"}
    with pytest.raises(SpecError, match="env.RATIO: must be a string \\(quote it\\), not float 0.5"):
        parse_spec({"name": "x", "services": {"a": {"command": "x", "env": {"RATIO": 0.5}}}}, source="t")


@pytest.mark.parametrize(("target", "message"), [
    ("/etc/mvm/guest.json", "under /etc/mvm, mvm's own files in the guest"),
    ("/usr/lib/mvm/mvm/guest/init.py", "under /usr/lib/mvm, mvm's own files"),
    ("/tmp/www/index.html", "would be hidden: the guest mounts a fresh file system on /tmp at every boot"),
    ("//run/x.txt", "on /run at every boot; put the file elsewhere (e.g. /srv/run/x.txt)"),
    ("/dev/./thing", "on /dev at every boot"),
    ("/lib/mvm/x.py", "under /usr/lib/mvm, mvm's own files"),  # merged /usr: /lib is usr/lib
    ("/var/run/app.pid", "on /run at every boot"),
    ("/var/lock/x", "on /run at every boot"),
])
def test_files_the_guest_would_never_see_or_that_break_it_are_refused(tmp_path: Path, target: str,
                                                                      message: str) -> None:
    """A file on /etc/mvm replaced the agent's config and the guest could not boot; one under
    /tmp was hidden by the tmpfs mounted there at boot: both were built without a word."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "mvm.toml").write_text(f'name = "x"\nfiles = {{ "{target}" = "f" }}\n')
    with pytest.raises(SpecError, match=re.escape(message)):
        load_toml(tmp_path)
    (tmp_path / "mvm.toml").write_text('name = "x"\nfiles = { "/tmpx/a" = "f", "/srv/tmp/a" = "f" }\n')
    assert set(load_toml(tmp_path).files) == {"/tmpx/a", "/srv/tmp/a"}


def test_a_top_level_key_inside_a_service_says_where_it_belongs(tmp_path: Path) -> None:
    (tmp_path / "mvm.toml").write_text('name = "x"\n[services.web]\ncommand = "true"\npackages = ["curl"]\n')
    with pytest.raises(SpecError, match=re.escape("services.web.packages: unknown key (`packages` is a key of the "
                                                  "spec itself: put it above the first [section])")):
        load_toml(tmp_path)
