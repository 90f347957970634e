"""A run lease: `<run dir>/lease.json` says which runner owns a run right now, so two batch runners
(two tmux windows, two machines) never train the same run at once.

    {"owner": {"host", "pid", "token", "machine", "start"}, "heartbeat_unix", "expires_after_s",
     "acquired_unix"[, "trainer": {"machine", "pid", "start"}]}

- Acquire is create-if-absent. Local disk: the body is written to a temp file and hard-linked
  to lease.json (link fails if it exists, so the file is never seen half-written), all under a
  flock on `.lease.lock` so create, takeover, refresh and release never interleave on one host.
  gs://: an upload with `if_generation_match=0`, then a read-back comparing the owner token. The
  read-back matters where preconditions are ignored (the stock gcp-storage-emulator): there,
  two writers can both "succeed" and the later upload wins, so the loser learns it on re-read
  after a short settle delay. With real GCS the precondition alone is exact.
- A lease whose heartbeat is older than its `expires_after_s` is stale (its runner died) and may
  be taken over; the takeover is logged. So is one whose owner ran on this machine (same boot id
  and pid namespace, `kellen.procs.machine_id`) and whose pid is gone: a killed batch's lease is
  taken over at once on the same machine, elsewhere after the expiry. The expiry defaults to
  300 s; `KELLEN_LEASE_EXPIRES_S` sets another (read when a Lease is made). On gs:// the takeover is conditional on the stale
  object's generation, so two runners cannot both take it.
- While held, a daemon thread refreshes the heartbeat every `refresh_every_s`; if it finds
  someone else's token there the lease was lost (`lost` is set, the owner is logged).
- release() deletes it only if it is still ours; it also runs at interpreter exit.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, Optional

from kellen import procs

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_EXPIRES_S = 300.0  # a runner that has not refreshed for 5 minutes is presumed dead
EXPIRES_ENV = "KELLEN_LEASE_EXPIRES_S"  # overrides DEFAULT_EXPIRES_S (seconds)


def default_expires_s() -> float:
    try:
        value = float(os.environ.get(EXPIRES_ENV) or DEFAULT_EXPIRES_S)
    except ValueError:
        log.warning("ignoring %s=%r: not a number of seconds", EXPIRES_ENV, os.environ.get(EXPIRES_ENV))
        return DEFAULT_EXPIRES_S
    return value if value > 0 else DEFAULT_EXPIRES_S
GCS_SETTLE_S = 0.5  # wait before reading back a gs:// lease (emulators without preconditions)


def is_live(body: Optional[Dict[str, Any]], now: Optional[float] = None) -> bool:
    """True when a lease body is held, its heartbeat is within its expiry and its owner is not a
    process of this machine that has died."""
    if not isinstance(body, dict) or procs.local_owner_dead(body.get("owner")):
        return False
    try:
        age = (time.time() if now is None else now) - float(body["heartbeat_unix"])
        return age <= float(body.get("expires_after_s", DEFAULT_EXPIRES_S))
    except (KeyError, TypeError, ValueError):
        return False  # unreadable leases are treated as stale, never as held forever


def describe(body: Optional[Dict[str, Any]]) -> str:
    owner = (body or {}).get("owner") or {}
    return f"{owner.get('host', '?')} pid {owner.get('pid', '?')}"


def _path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{LEASE_FILE}"


def read(run_dir: str) -> Optional[Dict[str, Any]]:
    """The lease body of a run dir, or None (absent or unreadable)."""
    body, _ = (_gcs_read if run_dir.startswith("gs://") else _local_read)(_path(run_dir))
    return body


class Lease:
    def __init__(self, run_dir: str, expires_after_s: Optional[float] = None,
                 refresh_every_s: Optional[float] = None):
        self.run_dir = run_dir.rstrip("/")
        self.path = _path(self.run_dir)
        self.remote = self.run_dir.startswith("gs://")
        self.expires_after_s = float(expires_after_s or default_expires_s())
        self.refresh_every_s = refresh_every_s or max(self.expires_after_s / 5, 0.05)
        self.owner = {"host": socket.gethostname(), "token": uuid.uuid4().hex, **procs.owner()}
        self.extra: Dict[str, Any] = {}  # more fields of the body, e.g. the trainer it started (note())
        self.held = False
        self.took_over: Optional[Dict[str, Any]] = None  # after acquire(): the stale lease replaced, if any
        self.lost = False  # set by the refresh thread if someone else's lease replaced ours
        self.holder: Optional[Dict[str, Any]] = None  # after a failed acquire: the live lease in the way
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._acquired_unix = 0.0

    # ------------------------------------------------------------------ public
    def acquire(self) -> bool:
        """Take the lease (creating it, or taking over a stale one); False if someone holds it."""
        if self.held:
            return True
        self._acquired_unix, self.took_over = time.time(), None
        ok = self._gcs_acquire() if self.remote else self._local_acquire()
        if ok:
            self.held, self.lost = True, False
            self._stop.clear()
            self._thread = threading.Thread(target=self._refresh_loop, name=f"lease {self.run_dir}", daemon=True)
            self._thread.start()
            atexit.register(self.release)
        return ok

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(self.refresh_every_s * 2, 5))
        try:
            self._gcs_release() if self.remote else self._local_release()
        except Exception as e:  # a lease left behind expires on its own
            log.warning("could not release lease %s: %s", self.path, e)
        with contextlib.suppress(Exception):
            atexit.unregister(self.release)

    def __enter__(self) -> "Lease":
        if not self.acquire():
            raise LeaseHeld(f"{self.run_dir} is leased by {describe(self.holder)}")
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ common
    def note(self, **fields: Any) -> None:
        """Add fields to the lease body and write it now (e.g. trainer=procs.owner(pid): a runner
        that finds this lease after we died can tell whether our trainer still runs)."""
        self.extra.update(fields)
        if self.held:
            try:
                self._gcs_refresh() if self.remote else self._local_refresh()
            except Exception as e:  # the next refresh writes it
                log.warning("lease update of %s failed: %s", self.path, e)

    def _body(self) -> Dict[str, Any]:
        return {**self.extra, "owner": self.owner, "heartbeat_unix": round(time.time(), 3),
                "expires_after_s": self.expires_after_s, "acquired_unix": round(self._acquired_unix, 3)}

    def _ours(self, body: Optional[Dict[str, Any]]) -> bool:
        return isinstance(body, dict) and (body.get("owner") or {}).get("token") == self.owner["token"]

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_every_s):
            try:
                still_ours = self._gcs_refresh() if self.remote else self._local_refresh()
            except Exception as e:  # a network blip: try again next interval; expiry is generous
                log.warning("lease refresh of %s failed: %s", self.path, e)
                continue
            if not still_ours:
                self.lost, self.held = True, False
                log.warning("lost the lease on %s to %s", self.run_dir, describe(self.holder))
                return

    def _taking_over(self, body: Optional[Dict[str, Any]]) -> None:
        self.took_over = body
        if body is not None:
            gone = ", its process is gone" if procs.local_owner_dead(body.get("owner")) else ""
            log.warning("taking over the stale lease on %s from %s (heartbeat %.0f s ago%s)", self.run_dir,
                        describe(body), time.time() - float(body.get("heartbeat_unix", 0) or 0), gone)

    # ------------------------------------------------------------------ local disk
    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, ".lease.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write_tmp(self) -> str:
        fd, tmp = tempfile.mkstemp(prefix=".lease.", dir=self.run_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(self._body(), f)
        return tmp

    def _local_acquire(self) -> bool:
        with self._locked():
            body, exists = _local_read(self.path)
            if exists and is_live(body):
                self.holder = body
                return False
            tmp = self._write_tmp()
            try:
                if exists:
                    self._taking_over(body)
                    os.replace(tmp, self.path)
                else:
                    os.link(tmp, self.path)  # create-if-absent with the whole body at once
            except FileExistsError:
                self.holder, _ = _local_read(self.path)
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return self._ours(_local_read(self.path)[0])

    def _local_refresh(self) -> bool:
        with self._locked():
            body, _ = _local_read(self.path)
            if not self._ours(body):
                self.holder = body
                return False
            os.replace(self._write_tmp(), self.path)
            return True

    def _local_release(self) -> None:
        with self._locked():
            if self._ours(_local_read(self.path)[0]):
                os.unlink(self.path)

    # ------------------------------------------------------------------ gs://
    def _blob(self):
        from kellen import gcs

        bucket, name = gcs.split_gcs(self.path)
        return gcs.client().bucket(bucket).blob(name)

    def _gcs_acquire(self) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        body, generation = _gcs_read(self.path)
        if generation is not None and is_live(body):
            self.holder = body
            return False
        if generation is not None:
            self._taking_over(body)
        try:  # generation 0 = "must not exist"; else "must still be the stale lease we read"
            self._blob().upload_from_string(json.dumps(self._body()), content_type="application/json",
                                            if_generation_match=generation or 0)
        except PreconditionFailed:
            self.holder, _ = _gcs_read(self.path)
            return False
        time.sleep(GCS_SETTLE_S)
        now, _ = _gcs_read(self.path)
        if not self._ours(now):  # a concurrent writer won where the precondition was not enforced
            self.holder = now
            return False
        return True

    def _gcs_refresh(self) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        body, generation = _gcs_read(self.path)
        if generation is None or not self._ours(body):
            self.holder = body
            return False
        try:
            self._blob().upload_from_string(json.dumps(self._body()), content_type="application/json",
                                            if_generation_match=generation)
        except PreconditionFailed:
            self.holder, _ = _gcs_read(self.path)
            return False
        return True

    def _gcs_release(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        body, generation = _gcs_read(self.path)
        if generation is not None and self._ours(body):
            with contextlib.suppress(NotFound, PreconditionFailed):
                self._blob().delete(if_generation_match=generation)


class LeaseHeld(RuntimeError):
    """Raised by `with Lease(...)` when another live runner holds it."""


def _local_read(path: str):
    """(body or None, whether the file exists)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None, False
    try:
        body = json.loads(text)
        return (body if isinstance(body, dict) else None), True
    except ValueError:
        return None, True


def _gcs_read(path: str):
    """(body or None, generation or None when absent)."""
    from google.api_core.exceptions import NotFound

    from kellen import gcs

    bucket, name = gcs.split_gcs(path)
    blob = gcs.client().bucket(bucket).get_blob(name)
    if blob is None:
        return None, None
    try:
        text = blob.download_as_bytes(if_generation_match=blob.generation).decode("utf-8")
        body = json.loads(text)
    except NotFound:
        return None, None
    except Exception:  # replaced between the two calls, or not JSON: stale either way
        return None, blob.generation
    return (body if isinstance(body, dict) else None), blob.generation
