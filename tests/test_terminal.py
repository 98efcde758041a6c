"""`kill` and a closed terminal stop long work like Ctrl-C, so its `finally` blocks (a sweep's trials, the
worktree `bench --against` checked out) run."""

import signal

import pytest

from blueberry.terminal import StopSignal, stop_signals_raise


def test_sigterm_inside_raises_a_keyboard_interrupt_naming_it_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(KeyboardInterrupt) as stopped:
        with stop_signals_raise():
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                cleaned.append(True)
    assert isinstance(stopped.value, StopSignal) and stopped.value.signum == signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before
