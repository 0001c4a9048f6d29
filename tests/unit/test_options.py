from pathlib import Path

import pytest

from mvm._api.options import parse_env, parse_port
from mvm.backends.base import PortForward
from mvm.errors import UsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", PortForward(8080, 80)),
        ("0.0.0.0:8080:80", PortForward(8080, 80, "0.0.0.0")),
        ("5353:53/udp", PortForward(5353, 53, proto="udp")),
        ("1:65535/tcp", PortForward(1, 65535)),
        ("8080", PortForward(0, 8080)),  # a free host port is picked
        ("53/udp", PortForward(0, 53, proto="udp")),
    ],
)
def test_parse_port(text: str, expected: PortForward) -> None:
    assert parse_port(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "guest port '' is not a number"),
        ("x", "guest port 'x' is not a number"),
        ("a:80", "host port 'a' is not a number"),
        ("80:b", "guest port 'b' is not a number"),
        ("70000:80", "out of range"),
        ("0:80", "out of range"),
        ("8080:80/sctp", "must be tcp or udp"),
        ("host:8080:80", "and 'host' is not one"),
        ("1:2:3:4", "and '1:2' is not one"),
        ("18434:8080:9", "with three fields the first is the host's IPv4 address (IP:HOST:GUEST)"),
        ("8080:80,8081:81", "one forward per -p"),
    ],
)
def test_parse_port_errors_name_the_value(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_port(text)
    assert fragment in err.value.message
    assert repr(text) in err.value.message
    assert err.value.hint


@pytest.mark.parametrize(("text", "mib"), [("512", 512), ("512m", 512), ("2g", 2048), ("1.5G", 1536),
                                          ("512MiB", 512), ("1GB", 1024), (" 768 ", 768)])
def test_memory_takes_mib_or_dockers_units(text: str, mib: int) -> None:
    from mvm.cli.options import memory_mib

    assert memory_mib(text) == mib


@pytest.mark.parametrize(("text", "fragment"), [("12k", "is not a size"), ("1.3m", "not a whole number of MiB"),
                                                ("-5", "is not a size"), ("lots", "is not a size")])
def test_memory_errors_name_the_value(text: str, fragment: str) -> None:
    import typer

    from mvm.cli.options import memory_mib

    with pytest.raises(typer.BadParameter, match=fragment) as caught:
        memory_mib(text)
    assert repr(text) in str(caught.value)


def test_parse_env() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}


@pytest.mark.parametrize(("item", "fragment"), [("NOVALUE", "expected KEY=VALUE"), ("1A=x", "not a valid")])
def test_parse_env_errors(item: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_env([item])


@pytest.mark.parametrize(("env", "fragment"), [
    ({"A=B": "y"}, "'A=B' is not a valid variable name"),  # the guest refused it, as its service never started
    ({"1BAD": "x"}, "'1BAD' is not a valid variable name"),
    ({"A": 1}, "the value 1 is not a string"),
    ("A=1", "give a list of KEY=VALUE strings or a mapping"),
])
def test_the_apis_env_is_checked_as_the_clis(env: object, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_env(env)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"memory": "512"}, "memory='512': must be a whole number"),
    ({"cpus": 1.5}, "cpus=1.5: must be a whole number"),
    ({"volumes": "/x:/data"}, "volumes='/x:/data': give a list"),
    ({"ports": "8080:80"}, "ports='8080:80': give a list"),
])
def test_the_apis_up_refuses_wrong_types_by_name(kwargs: dict[str, object], fragment: str) -> None:
    from mvm._api.up_plan import UpRequest

    with pytest.raises(UsageError, match=fragment):
        UpRequest.parse(**kwargs)  # type: ignore[arg-type]


def test_an_int_port_is_a_guest_port() -> None:
    from mvm._api.up_plan import UpRequest

    assert UpRequest.parse(ports=[8080]).forwards == [parse_port("8080")]


def test_a_timeout_without_wait_is_refused_not_ignored() -> None:
    from mvm import HEALTH_TIMEOUT
    from mvm.cli.options import wait_timeout

    assert wait_timeout(True, None) == HEALTH_TIMEOUT and wait_timeout(True, 15) == 15
    assert wait_timeout(False, None) == HEALTH_TIMEOUT  # unused, and not asked for
    with pytest.raises(Exception, match="--timeout 15 is how long --wait waits .*: add --wait, or drop --timeout") \
            as err:
        wait_timeout(False, 15)
    assert type(err.value).__name__ == "UsageError"  # click's: exit 2 with the usage line


def test_cp_names_the_vm_that_is_not_there_and_a_relative_guest_path(tmp_path: Path) -> None:
    from mvm._api.copy import cp, parse_endpoint
    from mvm.errors import VMNotFound
    from mvm.paths import Layout
    from mvm.runtime.registry import Registry

    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    for src in ("ghost:relative", "ghost:", "ghost:/x"):
        with pytest.raises(VMNotFound, match=f"no VM named 'ghost' \\(in '{src}'\\)"):
            cp(src, str(tmp_path), layout=layout)
    Registry(layout).files("web").root.mkdir(parents=True)
    with pytest.raises(UsageError, match="'web:tmp/x': the path in the VM must be absolute"):
        parse_endpoint("web:tmp/x", layout)
    assert parse_endpoint("web:/tmp/x", layout).vm == "web"
    assert parse_endpoint("./web:/tmp/x", layout).vm is None  # a host path may hold a colon
