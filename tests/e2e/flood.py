"""Run as root inside a guest: become a hostile agent. (Sent to the guest by test_hostile.py.)

PID 1 holds the guest's virtio-serial ports open, and a port can be opened only once; a
guest root takes copies of PID 1's descriptors instead (pidfd_getfd), so it writes to the
host exactly what a compromised agent would. For ``seconds`` it writes, to the event port
and to every control port: JSON nested 200,000 deep, lines of several MiB (one without an end
for a long while), floods of messages for other requests, events of the wrong types,
terminal escape sequences. The volume is bounded (``MiB`` in total) so the host's disk is not
what is tested.

Usage: python3 flood.py SECONDS MIB
"""

import ctypes
import json
import os
import sys
import threading
import time

SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438


def ports() -> dict[str, int]:
    """name -> a descriptor of PID 1's open port."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(SYS_PIDFD_OPEN, 1, 0)
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open")
    names = {}
    for dev in os.listdir("/sys/class/virtio-ports"):
        with open(f"/sys/class/virtio-ports/{dev}/name") as f:
            names[f"/dev/{dev}"] = f.read().strip()
    found = {}
    for fd in os.listdir("/proc/1/fd"):
        try:
            target = os.readlink(f"/proc/1/fd/{fd}")
        except OSError:
            continue
        if target in names and names[target] not in found:
            mine = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if mine >= 0:
                found[names[target]] = mine
    return found


def main() -> None:
    seconds, budget = float(sys.argv[1]), int(sys.argv[2]) << 20
    fds = ports()
    print("ports:", sorted(fds), flush=True)
    deep = b"[" * 200_000 + b"]" * 200_000 + b"\n"
    escapes = json.dumps({"kind": "log", "t": time.time(), "svc": "web\x1b]0;pwned\x07",
                          "line": "\x1b[2J\x1b]52;c;cHduZWQ=\x07 owned"}).encode() + b"\n"
    wrong = b'{"kind":"log","t":"noon","svc":{"a":[1]},"line":["x"]}\n{"kind":"health","exit":{},"state":[]}\n'
    foreign = b'{"id":"not-yours","event":"stdout","data":"AAAA"}\n' * 2000
    bad_event = b'{"id":"x","event":"stdout","data":"%%%"}\n'
    long_line = b"x" * (3 << 20) + b"\n"
    rounds = [deep, escapes, wrong, foreign, bad_event, long_line]
    end = time.monotonic() + seconds
    totals = {}

    def flood(name: str, fd: int) -> None:
        # A write to a control port blocks while no host client is connected (so one thread
        # per port), and goes through as soon as one connects: that client reads the garbage.
        written, i = 0, 0
        while time.monotonic() < end and written < budget // len(fds):
            chunk = rounds[i % len(rounds)]
            i += 1
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view[:32768]):]
                written += len(chunk)
            except OSError:
                time.sleep(0.1)
            time.sleep(0.02)
        totals[name] = written

    threads = [threading.Thread(target=flood, args=item, daemon=True) for item in fds.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()) + 1)
    print(f"wrote {sum(totals.values()) >> 20} MiB: {totals}", flush=True)
    os._exit(0)  # writers still blocked on a port with no host client end with us


if __name__ == "__main__":
    main()
