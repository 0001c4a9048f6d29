"""The QMP session when it is cut short: Ctrl-C while QEMU has not sent its greeting yet
(as during a boot) must end quietly, with nothing but mvm's own message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_INTERRUPTED_GREETING = """
import gc, os, signal, socket, sys, threading
from pathlib import Path
from mvm.backends.qmp import QMP
path = Path(sys.argv[1])
server = socket.socket(socket.AF_UNIX)
server.bind(str(path))
server.listen()
held = []
threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()  # never greets
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    with QMP(path, "web", timeout=5):
        pass
except KeyboardInterrupt:
    print("interrupted", flush=True)
gc.collect()  # an abandoned task's exception is reported when it is collected
"""


def test_ctrl_c_during_the_greeting_prints_no_traceback(tmp_path: Path) -> None:
    """It printed "Task exception was never retrieved" and an AssertionError traceback from
    qemu.qmp (Ctrl-C 0.3 s into an `up`), then mvm's own "interrupted" line."""
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_GREETING, str(tmp_path / "qmp.sock")],
                       capture_output=True, text=True, timeout=30)
    assert (r.stdout, r.stderr) == ("interrupted\n", "")


def test_qemu_qmp_logs_are_quiet_only_while_a_session_is_open(tmp_path: Path) -> None:
    """mvm reports QMP failures itself, so qemu.qmp's own ERROR lines are muted, but only
    during a session: an application's level for that logger comes back after it."""
    import logging

    import pytest

    from mvm.backends.qmp import QMP
    from mvm.errors import VMError

    qmp_log = logging.getLogger("qemu.qmp")
    qmp_log.setLevel(logging.INFO)
    try:
        with pytest.raises(VMError, match="cannot talk to QEMU's monitor"), QMP(tmp_path / "none.sock", "web",
                                                                                timeout=0.5):
            pass
        assert qmp_log.level == logging.INFO
    finally:
        qmp_log.setLevel(logging.NOTSET)
