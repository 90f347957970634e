"""Weights & Biases logging for process 0 of a training run; a mirror of the local run record.

W&B is optional: any failure (missing package, no network, quota, bad key) warns once and turns
the wrapper into a no-op, so training and the local record (logs/metrics.jsonl) carry on.

Offline runs land under `<directory>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<run id>/` (a `-1`, `-2`
suffix when two start within one second). Resuming an offline run with the same id writes a NEW
`offline-run-*` directory (a segment) next to the old one; the steps continue across segments. To
upload later from a machine with network and a key:

    wandb sync <directory>/wandb/offline-run-*   # segments of one id upload in start-time order
    cd <directory> && wandb sync --yes            # or everything not yet synced under ./wandb

`wandb leet inspect --summary <segment dir>` shows a segment locally.
"""
from __future__ import annotations

import glob
import netrc
import os
import random
import string
import struct
import sys
import warnings
from typing import Any, Dict, Iterable, Mapping, Optional
from urllib.parse import urlparse

MODES = ("online", "offline", "disabled")
_ENV_ALIASES = {"dryrun": "offline", "run": "online"}  # legacy WANDB_MODE spellings


def _has_api_key(env: Mapping[str, str]) -> bool:
    if env.get("WANDB_API_KEY", "").strip():
        return True
    # `wandb login` stores the key in netrc under the API host.
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(configured: Optional[str], env: Mapping[str, str] = os.environ) -> str:
    """config `wandb.mode` > WANDB_MODE > online if a key is configured > offline."""
    if configured:
        if configured not in MODES:
            raise ValueError(f"wandb.mode must be one of {', '.join(MODES)}; got {configured!r}")
        return configured
    mode = env.get("WANDB_MODE", "").strip().lower()
    mode = _ENV_ALIASES.get(mode, mode)
    if mode in MODES:
        return mode
    return "online" if _has_api_key(env) else "offline"


def new_run_id() -> str:
    """8 characters of [a-z0-9], like the ids W&B generates itself."""
    rng = random.SystemRandom()
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _scalar(v: Any) -> Any:
    """A loggable number, or None. numpy/jax 0-d values become Python numbers."""
    if getattr(v, "shape", None) == () and hasattr(v, "item"):
        try:
            v = v.item()
        except Exception:
            return None
    return v if isinstance(v, (bool, int, float)) else None


def _history_steps(path: str) -> Iterable[int]:
    """Steps of the history records in a `.wandb` transaction log (LevelDB-log framing: 32 KiB
    blocks, 7-byte file header, records `<IHB` crc/length/type split FULL/FIRST/MIDDLE/LAST).
    A torn tail from a crashed writer just ends the scan."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # zero padding at a block end
            pos += left
            continue
        _, n, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 or pos + 7 + n > len(data):
            break
        chunks.append(data[pos + 7:pos + 7 + n])
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            chunks = []
            if rec.WhichOneof("record_type") == "history":
                yield rec.history.step.num


def offline_segments(directory: str, run_id: str) -> list:
    """The `offline-run-*` directories of `run_id` under `directory/wandb`, oldest first."""
    out = []
    for d in glob.glob(os.path.join(directory, "wandb", f"offline-run-*-{glob.escape(run_id)}*")):
        stamp, _, rest = os.path.basename(d)[len("offline-run-"):].partition("-")
        suffix = rest[len(run_id) + 1:]
        if rest == run_id or (rest.startswith(run_id + "-") and suffix.isdigit()):
            out.append(((stamp, int(suffix or 0)), d))
    return [d for _, d in sorted(out)]


def _offline_last_step(directory: str, run_id: str) -> int:
    last = -1
    for seg in offline_segments(directory, run_id):
        for path in glob.glob(os.path.join(seg, "*.wandb")):
            try:
                last = max([last, *_history_steps(path)])
            except Exception:  # unreadable segment: do not let it block logging
                pass
    return last


class WandbRun:
    """One W&B run; every method is a no-op once W&B is disabled or has failed."""

    def __init__(self, *, project: str, group: Optional[str], name: str, run_id: str, tags,
                 job_type: Optional[str], config: Dict[str, Any], directory: str, mode: str,
                 entity: Optional[str] = None, notes: Optional[str] = None,
                 init_timeout: float = 60.0):
        self.project, self.group, self.name, self.run_id = project, group, name, run_id
        self.tags, self.job_type, self.config, self.directory = list(tags or ()), job_type, config, directory
        self.mode, self.entity, self.notes, self.init_timeout = mode, entity, notes, init_timeout
        self._run = None
        self._floor = -1  # steps <= floor were logged by an earlier segment: W&B would reject them
        self._last = -1   # last step logged here; the same step again merges into that row

    @property
    def active(self) -> bool:
        return self._run is not None

    def _fail(self, what: str, e: BaseException) -> None:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"W&B {what} failed ({type(e).__name__}: {msg}); training continues without "
                      f"W&B, the local run record is kept", RuntimeWarning, stacklevel=3)
        self._run = None

    def start(self) -> bool:
        if self._run is not None or self.mode == "disabled":
            return self._run is not None
        try:
            import wandb
            os.makedirs(self.directory, exist_ok=True)
            offline_last = _offline_last_step(self.directory, self.run_id)
            # Keep code, git state (remote URLs can embed tokens) and job artifacts out of W&B;
            # a bounded init timeout so an unreachable server fails instead of hanging.
            settings = wandb.Settings(save_code=False, disable_code=True, disable_git=True,
                                      disable_job_creation=True, init_timeout=self.init_timeout)
            # W&B records the command line in its metadata; overrides can carry URLs with tokens.
            from kellen.train.redact import redact
            argv, sys.argv = sys.argv, [redact(a) for a in sys.argv]
            try:
                run = wandb.init(project=self.project, group=self.group, name=self.name, id=self.run_id,
                                 resume="allow", tags=self.tags, job_type=self.job_type, config=self.config,
                                 dir=self.directory, mode=self.mode, entity=self.entity, notes=self.notes,
                                 settings=settings)
            finally:
                sys.argv = argv
            # Online resume: the server says where the run stopped (starting_step = last step + 1).
            self._floor = max(offline_last, int(run.starting_step or 0) - 1)
            self._last = -1
            self._run = run
            return True
        except Exception as e:
            self._fail("init", e)
            return False

    def log(self, row: Mapping[str, Any], step: int) -> None:
        if self._run is None:
            return
        step = int(step)
        if step <= self._floor or step < self._last:  # re-logged after a resume: already in W&B
            return
        clean = {k: s for k, s in ((k, _scalar(v)) for k, v in row.items()) if s is not None}
        if not clean:
            return
        try:
            self._run.log(clean, step=step)
            self._last = step
        except Exception as e:
            self._fail("log", e)

    def summary_update(self, d: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.summary.update(dict(d))
        except Exception as e:
            self._fail("summary update", e)

    def finish(self, exit_code: int = 0) -> None:
        run, self._run = self._run, None  # idempotent: a second call finds nothing to finish
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:
            self._fail("finish", e)
