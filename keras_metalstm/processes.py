"""Whether a process that left a file behind (a temporary export, a run's state.json) still runs on this machine."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True if process `pid` runs on this machine (this process included); another user's process counts too."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
