# The body of /usr/lib/mvm/init, PID 1. Both builders prepend "#!<guest python> -IS".
# The first thing it does is note the time, so the boot timeline separates the
# interpreter's own start-up from importing and running the init.
import time

_started = time.monotonic()
import sys  # noqa: E402

sys.path.insert(0, "/usr/lib/mvm")
from mvm.guest.init import main  # noqa: E402

main(_started)
