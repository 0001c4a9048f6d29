"""The guest's clock keeper (mvm.guest.clock): its decisions, against a fake RTC and clock."""

import threading

import pytest

from mvm.guest import clock


class Clocks:
    """A guest clock ``behind`` the host's; the RTC reads the host's, in whole seconds."""

    def __init__(self, host: float, behind: float) -> None:
        self.host = host
        self.behind = behind
        self.set_to: float | None = None

    def rtc(self) -> int:
        return int(self.host)

    def now(self) -> float:
        return self.host - self.behind

    def sleep(self, secs: float) -> None:
        self.host += secs

    def settime(self, t: float) -> None:
        self.set_to = t

    def step(self) -> float | None:
        return clock.step_to_rtc(self.rtc, self.now, settime=self.settime, sleep=self.sleep)


def test_a_clock_within_the_rtcs_whole_seconds_is_left_alone() -> None:
    for behind in (0.0, 0.9, -0.9, 1.9):
        c = Clocks(1000.5, behind)
        assert c.step() is None
        assert c.set_to is None


def test_a_paused_clock_is_set_to_the_rtcs_next_second_as_it_begins() -> None:
    c = Clocks(1000.5, behind=68.8)
    step = c.step()
    assert c.set_to == 1001.0 and 1000.99 <= c.host <= 1001.01  # set at the edge of the second
    assert step is not None and abs(step - 68.8) < 0.02


def test_a_clock_ahead_is_set_back() -> None:
    c = Clocks(1000.2, behind=-30.0)
    step = c.step()
    assert c.set_to == 1001.0 and step is not None and step < -29


def test_the_keeper_reports_each_step_goes_on_past_a_failed_read_and_stops_without_an_rtc(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "CHECK_EVERY", 0.01)
    said: list[str] = []
    steps = iter([None, 68.8, OSError(5, "Input/output error"), OSError(5, "again"), None, -30.0])

    def step_once() -> float | None:
        step = next(steps, FileNotFoundError(2, "No such file or directory", clock.RTC))
        if isinstance(step, OSError):
            raise step
        return step

    keeper = threading.Thread(target=clock.keep, args=(threading.Event(), said.append, step_once))
    keeper.start()
    keeper.join(5)
    assert not keeper.is_alive()
    assert said[0].startswith("clock: 68.8 s behind the host's")
    assert said[1].startswith("clock: cannot read the RTC ([Errno 5] Input/output error)")  # once, not twice
    assert said[2].startswith("clock: 30.0 s ahead of") and "has no RTC" in said[3] and len(said) == 4


def test_a_clock_set_while_waiting_for_the_edge_is_left_alone() -> None:
    """The host's ping sets the exact time while the keeper waits for the RTC's next second:
    setting the RTC's whole second over it would make it less exact."""
    c = Clocks(1000.5, behind=30.0)
    reads = iter([1000])

    def rtc() -> int:
        value = next(reads, None)
        if value is None:
            c.behind = 0.0  # the ping came
            return int(c.host)
        return value

    assert clock.step_to_rtc(rtc, c.now, settime=c.settime, sleep=c.sleep) is None and c.set_to is None


def test_the_keeper_ends_when_asked() -> None:
    stopping = threading.Event()
    keeper = threading.Thread(target=clock.keep, args=(stopping, print, lambda: None))
    keeper.start()
    stopping.set()
    keeper.join(clock.CHECK_EVERY + 5)
    assert not keeper.is_alive()
