"""The signals that ask a run or a sweep to stop cleanly, and the terminal going away (SIGHUP: an ssh session
dropped), after which every write to it fails."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def stop_signals() -> list[signal.Signals]:
    """SIGINT, SIGTERM, and SIGHUP unless it is ignored (`nohup blueberry ...`, where it stays ignored)."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


def detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null, as `nohup` would have: after a hangup the terminal is gone, and a
    write to it (a progress line, the last messages) fails with EIO before the work is saved."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed stream, or one that was never a file
            stream.flush()
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


class StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP raised as Ctrl-C is, so the work stops cleanly (`finally` blocks run); `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, frame):
    if signum == signal.SIGHUP:  # the terminal is gone: the messages while the work stops must not fail
        detach_from_terminal()
    raise StopSignal(signum)


@contextlib.contextmanager
def stop_signals_raise():
    """Within: `kill` and a closed terminal stop the work like Ctrl-C (StopSignal, a KeyboardInterrupt)."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in stop_signals() if sig != signal.SIGINT}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
