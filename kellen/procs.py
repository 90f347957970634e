"""Which process owns a run, and whether it still lives: used by the run lease, the batch runner
and the trainer's status.json (kellen.experiments.lease, kellen.experiments.plan, RunRecord.status).

- `machine_id()` names the process table this process sees: the kernel's boot id plus the pid
  namespace. Two records with the same machine id and a pid can be checked for liveness here;
  a hostname alone could not (containers share hostnames, pids repeat across namespaces).
- `pid_alive(pid)`: the process exists and is not a zombie (a dead child not yet reaped).
- `owner(pid)` = {"machine", "pid", "start"}: one process, for good (the start time tells a reused pid).
- `local_owner_dead(owner)`: True only when `owner` is on this machine and that process is gone;
  unknown or remote owners are never declared dead here (their heartbeat is); `local_owner_alive`.
- `parent_death_prefix()`: argv words that make a child get SIGTERM when its parent dies (Linux
  prctl PR_SET_PDEATHSIG, set in a tiny exec wrapper rather than a preexec_fn, which is unsafe in a
  process with threads). A trainer started that way saves and exits 75 when its batch is killed.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Dict, List, Mapping, Optional


@functools.lru_cache(maxsize=None)
def machine_id() -> str:
    """'<boot id>/<pid namespace>' on Linux; '' where that cannot be read (no liveness checks)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{pidns}" if boot and pidns else ""


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None.
    With the pid it names one process for good: a reused pid has another start."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError, TypeError):
        return None


def owner(pid: Optional[int] = None) -> Dict[str, Any]:
    """{"machine", "pid", "start"} naming process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else int(pid)
    return {"machine": machine_id(), "pid": pid, "start": process_start(pid)}


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists (any user's) and is not a zombie."""
    try:
        pid = int(pid)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


def _local(who: Optional[Mapping[str, Any]]) -> bool:
    here = machine_id()
    return isinstance(who, Mapping) and bool(here) and who.get("machine") == here and who.get("pid") is not None


def _runs(who: Mapping[str, Any]) -> bool:
    if not pid_alive(who["pid"]):
        return False
    start = who.get("start")
    return start is None or process_start(who["pid"]) in (None, start)  # else: the pid was reused


def local_owner_dead(who: Optional[Mapping[str, Any]]) -> bool:
    """True when `who` ({"machine", "pid"[, "start"]}) is a process of this machine that no longer runs."""
    return _local(who) and not _runs(who)


def local_owner_alive(who: Optional[Mapping[str, Any]]) -> bool:
    """True when `who` is a process of this machine that is still running."""
    return _local(who) and _runs(who)


# Run as `python -I -S -c _PDEATH <parent pid> <program> <args...>`: ask for SIGTERM on the parent's
# death, give up at once if the parent is already gone, then become the program.
_PDEATH = ("import os,signal,sys\n"
           "try:\n"
           "    import ctypes\n"
           "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"  # 1 = PR_SET_PDEATHSIG
           "except Exception:\n"
           "    pass\n"
           "if os.getppid() != int(sys.argv[1]): os.kill(os.getpid(), signal.SIGTERM)\n"
           "os.execvp(sys.argv[2], sys.argv[2:])\n")


def parent_death_prefix(python: Optional[str] = None) -> List[str]:
    """Words to put before a child's argv so that it gets SIGTERM when this process dies (the
    process that calls Popen must be the one whose death counts: the kernel sends it when the
    forking thread ends); [] where the kernel has no such feature."""
    if not sys.platform.startswith("linux"):
        return []
    return [python or sys.executable, "-I", "-S", "-c", _PDEATH, str(os.getpid())]

