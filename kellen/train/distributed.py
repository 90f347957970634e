"""Process setup that must happen before JAX touches a backend: multi-process init and the
persistent compilation cache; and the peer watch, which turns a lost process into a clean exit.

A process of a multi-process run that dies (kill -9, a lost VM) leaves the others blocked in a
collective, or failing one ("Gloo ... Connection closed by peer"); JAX's coordination service
aborts them (SIGABRT) only after its heartbeat timeout. The peer watch, a daemon thread, beats a
counter in the coordination service's key-value store and reads every peer's: a peer silent for
`distributed.heartbeat_timeout_seconds` is lost, and the registered handler (the run's: FAILED.txt
and status.json `failed`, "peer process N lost") runs before the process exits with code 1.
JAX's own heartbeat timeout is set to twice that, as a backstop. A process that leaves on purpose
signs off first: "done" (completed, preempted) is never counted lost; "failed" only by a peer
still waiting for it after the timeout.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from typing import Callable, Dict, Optional

from kellen.model.config import ConfigError

PEER_LOST_EXIT_CODE = 1
_KEY = "kellen/peer_watch"
SIGNED_OFF = ("done", "failed", "exited")


def _env_int(name: str):
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment {name}={v!r} must be an integer") from None


def on_tpu_pod() -> bool:
    """A multi-host TPU slice announces its workers in the environment."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(dist) -> None:
    """jax.distributed from config or KELLEN_* env; automatic on a TPU pod; else single process."""
    import jax

    cpu_devices = dist.cpu_devices_per_process or _env_int("KELLEN_CPU_DEVICES")
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    coordinator = dist.coordinator_address or os.environ.get("KELLEN_COORDINATOR")
    num = dist.num_processes if dist.num_processes is not None else _env_int("KELLEN_NUM_PROCESSES")
    pid = dist.process_id if dist.process_id is not None else _env_int("KELLEN_PROCESS_ID")
    if jax.distributed.is_initialized():
        return
    timeout = dist.heartbeat_timeout_seconds
    if timeout <= 0 or dist.initialization_timeout_seconds <= 0:
        raise ConfigError("distributed.heartbeat_timeout_seconds and distributed.initialization_timeout_seconds "
                          "must be > 0")
    timeouts = dict(initialization_timeout=int(dist.initialization_timeout_seconds),
                    heartbeat_timeout_seconds=int(2 * timeout))  # JAX's abort: the backstop
    if coordinator:
        if num is None or pid is None:
            raise ConfigError("distributed.coordinator_address needs distributed.num_processes and "
                              "distributed.process_id (or KELLEN_NUM_PROCESSES / KELLEN_PROCESS_ID)")
        if not 0 <= pid < num:
            raise ConfigError(f"distributed.process_id={pid} must be in [0, {num})")
        jax.distributed.initialize(coordinator, num, pid, **timeouts)
    elif dist.auto and on_tpu_pod():
        jax.distributed.initialize(**timeouts)
    else:
        return
    start_peer_watch(timeout)


class PeerWatch:
    """Beats this process's counter and watches the peers' (see the module doc). The handler runs
    once, on the watch thread, then the process exits: the main thread may be stuck in a collective."""

    def __init__(self, client, pid: int, num: int, timeout: float, exit: Callable[[int], None] = os._exit):
        self.client, self.pid, self.timeout, self.exit = client, pid, float(timeout), exit
        self.interval = max(0.2, min(5.0, self.timeout / 5))
        self.peers = [p for p in range(num) if p != pid]
        self.handler: Optional[Callable[[str, str], None]] = None  # (reason, detail for FAILED.txt)
        self.cause: Optional[BaseException] = None  # the error this process saw meanwhile, if any
        self.verdict: Optional[str] = None
        self.stopped = threading.Event()
        self.changed = threading.Condition()
        now = time.monotonic()
        self.seen: Dict[int, tuple] = {p: (None, now, 0) for p in self.peers}  # value, when it changed, changes
        self.thread = threading.Thread(target=self._run, name="kellen-peer-watch", daemon=True)

    def _key(self, pid: int) -> str:
        return f"{_KEY}/{pid}"

    def _run(self) -> None:
        beat = 0
        while not self.stopped.wait(self.interval):
            beat += 1
            try:
                self.client.key_value_set(self._key(self.pid), str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(_KEY))
            except Exception:  # the coordinator (process 0) is unreachable: no news from anyone
                values = {}
            now = time.monotonic()
            with self.changed:
                for p in self.peers:
                    v = values.get(self._key(p))
                    old, when, n = self.seen[p]
                    if v is not None and v != old:
                        self.seen[p] = (v, now, n + 1)
                self.changed.notify_all()
            lost = [p for p in self.peers if self.seen[p][0] != "done" and now - self.seen[p][1] >= self.timeout]
            if lost and not self.stopped.is_set():
                self._lose(lost)
                return

    def _lose(self, lost) -> None:
        def one(p):
            if self.seen[p][0] in SIGNED_OFF:  # it left on its own while this process still needed it
                return f"process {p} {'exited early' if self.seen[p][0] == 'exited' else 'failed'} (see its log)"
            return f"process {p} lost ({'the coordinator; ' if p == 0 else ''}no heartbeat for {self.timeout:g} s)"
        self.verdict = "peer " + "; ".join(one(p) for p in lost) + \
            "; start all processes again to resume from the last committed checkpoint"
        print(f"pretrain_jax.py: error: process {self.pid}: {self.verdict}", file=sys.stderr, flush=True)
        try:
            if self.handler is not None:
                detail = ("this process's own error meanwhile (a consequence):\n" +
                          "".join(traceback.format_exception(self.cause)) if self.cause is not None
                          else "(noticed by the peer watch; this process was waiting for the peer)\n")
                self.handler(self.verdict, detail)
        except BaseException as e:  # the exit below must happen whatever the handler does
            print(f"pretrain_jax.py: recording the lost peer failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # Not sys.exit: the main thread may be blocked in a collective, and JAX's atexit
            # shutdown would wait for the lost peer until its own heartbeat timeout, then abort.
            self.exit(PEER_LOST_EXIT_CODE)

    def sign_off(self, state: str) -> None:
        """This process leaves on purpose ("done", "failed", "exited"): stop beating and watching."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            self.client.key_value_set(self._key(self.pid), state, allow_overwrite=True)
        except Exception:
            pass

    def wait_for_verdict(self) -> Optional[str]:
        """Block until a peer is found lost (the watch then exits the process), or every peer has
        beaten twice more or signed off (none is lost: returns None); at most the timeout plus
        three beats."""
        deadline = time.monotonic() + self.timeout + 3 * self.interval
        with self.changed:
            start = {p: self.seen[p][2] for p in self.peers}
            while time.monotonic() < deadline and not self.stopped.is_set():
                if all(self.seen[p][2] > start[p] + 1 or self.seen[p][0] in SIGNED_OFF for p in self.peers):
                    return None
                self.changed.wait(self.interval)
        return self.verdict


_WATCH: Optional[PeerWatch] = None


def start_peer_watch(timeout: float) -> Optional[PeerWatch]:
    """After jax.distributed.initialize, without starting a backend (the compilation cache is set after)."""
    global _WATCH
    from jax._src import distributed as jd

    state = jd.global_state
    if state.client is None or (state.num_processes or 1) < 2:
        return None
    _WATCH = PeerWatch(state.client, state.process_id, state.num_processes, timeout)
    _WATCH.thread.start()
    atexit.register(sign_off, "exited")  # after JAX's own atexit was registered: runs before it
    return _WATCH


def on_peer_lost(handler: Optional[Callable[[str, str], None]]) -> None:
    """handler(reason, detail) runs on the watch thread when a peer is lost, just before the exit."""
    if _WATCH is not None:
        _WATCH.handler = handler


def sign_off(state: str) -> None:
    if _WATCH is not None:
        _WATCH.sign_off(state)


def wait_if_peer_lost(exc: BaseException) -> None:
    """An error in a multi-process run may come from a dead peer (a failed collective, however
    wrapped): give the watch its timeout to say so (it then records that and exits the process).
    Returns as soon as every peer has beaten again or signed off: then the error is this process's own."""
    if _WATCH is not None and isinstance(exc, Exception):
        _WATCH.cause = exc
        _WATCH.wait_for_verdict()


def enable_compilation_cache(path) -> None:
    """Persistent XLA compilation cache (local dir or gs://); None leaves it off."""
    if not path:
        return
    import jax

    if not path.startswith("gs://"):
        path = os.path.expanduser(path)
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
