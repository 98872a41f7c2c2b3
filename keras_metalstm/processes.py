"""Whether a process that left a file behind (a temporary export, a run's state.json) still runs on this machine."""

from __future__ import annotations

import os
from pathlib import Path


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


def process_start_time(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch to about a second (Linux: /proc), or None where
    that is unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        # Field 22 of /proc/<pid>/stat (the 20th after the command name): clock ticks from boot to the start.
        return float(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None
