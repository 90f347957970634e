"""How a run is launched on this host (`LocalLauncher`), and the contract every launcher keeps.

`python pretrain_jax.py <argv>` runs as a child process: an argument list (no shell), cwd = the
repo root, its own session (a terminal's Ctrl-C reaches only the batch, which decides), and on
Linux a parent-death signal (kellen.procs): if the batch dies without a word (SIGKILL, OOM), the
trainer still gets SIGTERM, saves and exits 75, instead of training on unsupervised. Its stdout
and stderr go straight to the batch's log files, never through a pipe to the batch, so nothing
it prints is lost or fails when the batch is gone; `echo=True` copies the files to our console.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Callable, Dict, List, Optional, Protocol

from kellen import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "pretrain_jax.py")


class Launcher(Protocol):
    """Runs one training run to completion. Contract for every launcher (local, tmux, TPU VM):

    - launch() blocks until the run's process(es) exit and returns the exit code of
      `python pretrain_jax.py <argv>` (for a pod: process 0's, or the first non-zero one):
      0 completed, 75 preempted/resumable, 2 bad config/data, anything else failed;
    - `env` is the whole environment to give the run; stdout/stderr go to the two files;
    - a KeyboardInterrupt raised in the calling thread while it waits (Ctrl-C, or the batch
      runner's SIGTERM handler) must stop the run gracefully: send SIGTERM to the run (it
      saves and exits 75), keep waiting, and return that exit code; a second KeyboardInterrupt
      kills the run's process group and re-raises. Nothing may be left running.
    - optional attribute `on_start`: if the runner sets it, it is called with the trainer's pid
      once the trainer process exists (the batch notes it in the run's lease).
    """
    name: str

    def launch(self, target, argv: List[str], env: Dict[str, str], stdout_path: str,
               stderr_path: str) -> int: ...


class LocalLauncher:
    """`python pretrain_jax.py` as a child process of this host (see the module doc)."""
    name = "local"

    def __init__(self, echo: bool = False, python: Optional[str] = None, grace_s: float = 900.0):
        self.echo = echo  # also copy the run's output to our stdout/stderr (single runs)
        self.python = python or sys.executable
        self.grace_s = grace_s  # after forwarding SIGTERM: how long to wait for the save before SIGKILL
        self.on_start: Optional[Callable[[int], None]] = None

    def command(self, argv: List[str]) -> List[str]:
        return procs.parent_death_prefix(self.python) + [self.python, PRETRAIN, *argv]

    def launch(self, target, argv: List[str], env: Dict[str, str], stdout_path: str, stderr_path: str) -> int:
        for p in (stdout_path, stderr_path):
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
            starts = (out.tell(), err.tell())
            proc = subprocess.Popen(self.command(argv), cwd=REPO, env=dict(env), stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        done = threading.Event()
        copiers = [] if not self.echo else [
            threading.Thread(target=_follow, args=(path, start, console, done), daemon=True)
            for path, start, console in ((stdout_path, starts[0], sys.stdout), (stderr_path, starts[1], sys.stderr))]
        for t in copiers:
            t.start()
        try:
            if self.on_start is not None:
                self.on_start(proc.pid)
            return self._wait(proc)
        finally:
            done.set()
            for t in copiers:
                t.join(timeout=10)

    def _wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            _signal_group(proc, signal.SIGTERM)  # the run saves at its next step and exits 75
            try:
                return proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                return proc.wait()
            except KeyboardInterrupt:  # asked twice: do not wait for the save
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
                raise
        except BaseException:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # start_new_session made the child its group's leader
        os.killpg(proc.pid, sig)


def _follow(path: str, start: int, console, done: threading.Event) -> None:
    """Copy what is appended to `path` after offset `start` to `console` until `done`, then the rest."""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            finished = done.is_set()
            chunk = f.read(65536)
            if chunk:
                try:
                    console.buffer.write(chunk)
                    console.flush()
                except (AttributeError, ValueError, OSError):
                    pass
                continue
            if finished:
                return
            done.wait(0.2)


def run_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment a run gets: ours, explicitly copied (so launchers never read os.environ)."""
    env = dict(os.environ)
    env.update(extra or {})
    return env
