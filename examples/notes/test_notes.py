"""The notes service's behaviour, each test against a real VM of its own.

    pytest examples/notes           # -n 2 (pytest-xdist) runs two at a time
"""

import urllib.error
import urllib.request
from pathlib import Path

import pytest

GUEST = Path(__file__).parent  # the directory of mvm.toml


@pytest.fixture()
def notes(mvm_vm):
    """A notes VM for one test: guest port 8080 forwarded from a free host port; healthy
    when it is returned, and brought down when the test ends, pass or fail."""
    return mvm_vm(GUEST, ports=[8080])


def post(vm, text):
    """POST a note; the HTTP status, error statuses included."""
    request = urllib.request.Request(vm.url(8080, "/notes"), data=text.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        with error:  # an error response holds its connection until it is closed
            return error.code


def get(vm, path="/notes"):
    with urllib.request.urlopen(vm.url(8080, path), timeout=10) as response:
        return response.read().decode()


def test_a_note_goes_through_the_forwarded_port(notes):
    assert post(notes, "buy milk") == 201
    assert get(notes) == "buy milk\n"


def test_a_note_is_written_to_the_file_by_the_service_user(notes):
    post(notes, "buy milk")
    result = notes.exec("cat", "/tmp/notes/notes.txt")
    assert result.exit_code == 0 and result.stdout == b"buy milk\n"
    assert notes.exec("stat", "-c", "%U", "/tmp/notes/notes.txt").stdout == b"mvm\n"  # not root


def test_a_note_of_two_lines_is_refused(notes):
    assert post(notes, "two\nlines") == 400
    assert notes.exec("test", "-e", "/tmp/notes/notes.txt").exit_code == 1  # nothing written


def test_the_service_survives_a_restart(notes):
    post(notes, "before")
    notes.restart()  # down and up again, same image and ports; returns once healthy
    assert notes.status == "running"
    assert get(notes, "/health") == "ok\n"
    assert get(notes) == ""  # /tmp lives as long as a boot: keep data on a volume instead
    assert post(notes, "after") == 201
    assert "notes" in [s.name for s in notes.details().guest.services]
