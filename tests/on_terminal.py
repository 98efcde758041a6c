"""A process on a terminal of its own, as a login shell's job runs, for the hangup tests."""

import fcntl
import os
import pty
import select
import signal
import subprocess
import termios


def _own_session_on_that_terminal():  # what a login shell's job gets: the pty as its controlling terminal
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # and SIGHUP's default, even if this suite runs under nohup


class OnTerminal:
    def __init__(self, argv: list[str], **popen):
        self.terminal, child_side = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=child_side, stdout=child_side, stderr=child_side,
                                        preexec_fn=_own_session_on_that_terminal, **popen)  # fmt: skip
        os.close(child_side)

    def drain(self) -> None:
        """Read what the process shows: a terminal nobody reads fills up and blocks the writer."""
        while select.select([self.terminal], [], [], 0.05)[0] and os.read(self.terminal, 65536):
            pass

    def hang_up(self) -> None:
        """The terminal goes away (an ssh session dropping): the kernel sends SIGHUP to the session."""
        os.close(self.terminal)
