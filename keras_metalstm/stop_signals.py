"""How a training session stops on a signal: Ctrl-C, SIGTERM (a scheduler) and SIGHUP (the terminal or SSH session
the run was started from closed) let the current meta-update finish and save a checkpoint, and output to a terminal
that hung up cannot fail the run before that."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import threading


class StopRequested(Exception):
    """Raised by work before the episode loop (pre-training theta_0's classifier) that a stop signal ended before it
    finished: its result is incomplete and must not be kept."""


class StopFlag:
    """Set by SIGINT/SIGTERM, or SIGHUP (the terminal or SSH session the run was started from closed): the loop
    saves a checkpoint and stops after the current meta-update."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        # A run started under nohup ignores SIGHUP so that it outlives the terminal: it keeps doing so.
        hangup = getattr(signal, "SIGHUP", None)  # none on Windows
        if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
            self._previous[hangup] = signal.signal(hangup, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up at once
        if signum == getattr(signal, "SIGHUP", None):
            leave_closed_terminal()
        self.signal = signum

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def leave_closed_terminal() -> bool:
    """Point standard output and error, where they are the closed terminal, at os.devnull: writing to a hung-up
    terminal fails (EIO), and the progress bar would stop the run before it saves its checkpoint. Output redirected
    to a file or a pipe, or to a terminal still open (a `kill -HUP`), still goes there. A hung-up terminal is a
    character device that isatty no longer takes for a terminal. Returns whether one was found."""
    found = False
    for descriptor in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.fstat(descriptor).st_mode) and not os.isatty(descriptor):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, descriptor)
                os.close(null)
                found = True
    return found


class OutputMayHangUp:
    """The session's callbacks, whose output to a terminal that has just hung up is dropped: the terminal closes,
    then SIGHUP stops the run at a checkpoint, and a progress bar writing between the two would otherwise fail the
    run with EIO first. Any other error of a callback, EIO on a file included, is raised as it is."""

    def __init__(self, callbacks):
        self._callbacks = callbacks

    def __getattr__(self, name):
        method = getattr(self._callbacks, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except OSError as error:
                if error.errno != errno.EIO or not leave_closed_terminal():
                    raise
                return None

        return call
