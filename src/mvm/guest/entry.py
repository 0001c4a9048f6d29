# The body of /usr/lib/mvm/init, PID 1. Both builders prepend "#!<guest python> -IS".
# The first thing it does is note the time, so the boot timeline separates the
# interpreter's own start-up from importing and running the init.
import time

_started = time.monotonic()
import sys  # noqa: E402

sys.path.insert(0, "/usr/lib/mvm")
# The root filesystem is an image nobody edits: a checked-hash .pyc (nixpkgs builds those)
# need not be checked against its source on every import of the init.
import _imp  # noqa: E402

_imp.check_hash_based_pycs = "never"
from mvm.guest.init import main  # noqa: E402

main(_started)
