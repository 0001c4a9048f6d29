"""The guest's clock keeper (mvm.guest.clock): its decisions, against a fake RTC and clock."""

import threading

import pytest

from mvm.guest import clock


class Clocks:
    """The host's time; a guest clock ``behind`` it; an RTC that counts the host's seconds, its
    own beginning ``phase`` seconds after the host's (QEMU's RTC: each process has its own)."""

    def __init__(self, host: float, behind: float, phase: float = 0.0) -> None:
        self.host, self.behind, self.phase = host, behind, phase
        self.set_to: float | None = None

    def rtc(self) -> int:
        return int(self.host - self.phase)

    def now(self) -> float:
        return self.host - self.behind

    def sleep(self, secs: float) -> None:
        self.host += secs

    def settime(self, t: float) -> None:
        self.set_to = t
        self.behind = self.host - t

    def keeper(self) -> clock.Keeper:
        return clock.Keeper(self.rtc, self.now, self.settime, self.sleep, monotonic=lambda: self.host)


def test_a_clock_within_the_rtcs_whole_seconds_is_left_alone() -> None:
    for behind in (0.0, 0.9, -0.9, 1.4):
        c = Clocks(1000.5, behind)
        assert c.keeper().check() is None and c.set_to is None


def test_a_paused_clock_is_set_to_the_rtcs_next_edge_half_a_second_off_at_most_before_the_phase_is_known() -> None:
    for phase in (0.0, 0.13, 0.64, 0.99):
        c = Clocks(1000.3, behind=68.8, phase=phase)
        step = c.keeper().check()
        assert step is not None and abs(c.behind) <= 0.5 + clock.EDGE_POLL, (phase, c.behind)


def test_once_the_host_set_the_clock_the_phase_makes_the_next_step_exact() -> None:
    c = Clocks(1000.3, behind=0.0, phase=0.64)
    keeper = c.keeper()
    keeper.exact.set()  # the host's ping
    assert keeper.check() is None and keeper.phase is not None and abs(keeper.phase - 0.64) <= 2 * clock.EDGE_POLL
    c.behind = 5.0  # a pause
    step = keeper.check()
    assert step is not None and abs(step - 5.0) < 0.05 and abs(c.behind) <= 2 * clock.EDGE_POLL


def test_a_clock_ahead_is_set_back() -> None:
    c = Clocks(1000.2, behind=-30.0)
    step = c.keeper().check()
    assert step is not None and step < -29 and abs(c.behind) <= 0.5 + clock.EDGE_POLL


def test_without_an_edge_the_clock_is_set_to_the_middle_of_the_rtcs_second() -> None:
    """A vCPU starved past the wait saw no edge: half a second off at most, not a second."""
    c = Clocks(1000.2, behind=40.0)
    keeper = clock.Keeper(lambda: 1000, c.now, c.settime, lambda secs: None,
                          monotonic=iter(range(100)).__next__)  # time runs out, the RTC never turns
    assert keeper.check() is not None and c.set_to == 1001.0


def test_a_clock_set_while_waiting_for_the_edge_is_left_alone() -> None:
    """The host's ping sets the exact time while the keeper waits for the RTC's next second."""
    c = Clocks(1000.5, behind=30.0)
    real_sleep = c.sleep

    def sleep(secs: float) -> None:
        c.behind = 0.0  # the ping came
        real_sleep(secs)

    keeper = clock.Keeper(c.rtc, c.now, c.settime, sleep, monotonic=lambda: c.host)
    assert keeper.check() is None and c.set_to is None


class Scripted(clock.Keeper):
    def __init__(self, steps: list[object]) -> None:
        super().__init__()
        self.steps = iter(steps)

    def check(self) -> float | None:
        step = next(self.steps, FileNotFoundError(2, "No such file or directory", clock.RTC))
        if isinstance(step, OSError):
            raise step
        assert step is None or isinstance(step, float)
        return step


def test_the_keeper_reports_each_step_goes_on_past_a_failed_read_and_stops_without_an_rtc(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "CHECK_EVERY", 0.01)
    said: list[str] = []
    keeper = Scripted([None, 68.8, OSError(5, "Input/output error"), OSError(5, "again"), None, -30.0])
    thread = threading.Thread(target=clock.keep, args=(threading.Event(), said.append, keeper))
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert said[0].startswith("clock: 68.8 s behind the host's")
    assert said[1].startswith("clock: cannot read the RTC ([Errno 5] Input/output error)")  # once, not twice
    assert said[2].startswith("clock: 30.0 s ahead of") and "has no RTC" in said[3] and len(said) == 4


def test_the_keeper_ends_when_asked() -> None:
    stopping = threading.Event()
    thread = threading.Thread(target=clock.keep, args=(stopping, print, Scripted([])))
    thread.start()
    stopping.set()
    thread.join(clock.CHECK_EVERY + 5)
    assert not thread.is_alive()


def test_a_ping_with_the_hosts_time_tells_the_keeper_the_clock_is_exact() -> None:
    import socket
    import time

    from mvm.guest.control import ControlServer
    from mvm.guest.execstream import Connection

    told: list[bool] = []
    server = ControlServer([], reaper=None, status=dict, shutdown=lambda grace: None,  # type: ignore[arg-type]
                           configure=lambda c: None, env_overrides={}, path="/bin", signals=None,  # type: ignore[arg-type]
                           clock_set=lambda: told.append(True))
    host, guest = socket.socketpair()
    with host, guest:
        conn = Connection(guest.fileno())
        server._dispatch(conn, b'{"op": "ping", "id": 1}')  # `clock_offset`: no time, nothing told
        host.recv(65536)
        assert told == []
        server._dispatch(conn, f'{{"op": "ping", "id": 2, "time": {time.time()}}}'.encode())
        host.recv(65536)
    assert told == [True]
