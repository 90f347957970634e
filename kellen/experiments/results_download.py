"""`kellen results download <group>`: copy a group's run records (and optionally checkpoints)
from gs:// to local disk, resumably.

Layout is what ``gsutil -m cp -r <output_root>/<group> <dest>/`` gives: ``<dest>/<group>/<run>/...``
(override variants like ``exp03_a--epochs=10000`` are run dirs of the group too). With
``--with-checkpoints`` the objects under ``<storage_root>/checkpoints/<group>/`` go to
``<dest>/checkpoints/<group>/<run>/...``; without it, ``<run>/checkpoints/`` is left out as well.

A local file with the blob's size and crc32c (else md5, else size) is skipped, and files land
under a temp name renamed into place, so re-running after an interruption fetches only the rest.
Every error (unknown group, no credentials, unwritable dest, nothing to fetch) is found before
the first byte moves and is one line.
"""
from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import os
import re
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from kellen import gcs
from kellen.gcs import local_path  # noqa: F401 -- object names never escape dest
from kellen.experiments import spec

PARTIAL_SUFFIX = ".kellen-partial"
_PARTIAL_RE = re.compile(r"^\..*\.[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX) + "$")
CHUNK_FILES, CHUNK_BYTES, WORKERS = 64, 256 << 20, 8  # chunks let the progress bar advance
AUTH_HINT = ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
             "to a service-account key file")
_EXCLUDE_RE = "^[^/]+/checkpoints/"  # <run>/checkpoints/..., as a gsutil/gcloud rsync exclude


@dataclass
class Summary:
    downloaded: int = 0  # files fetched
    skipped: int = 0  # files already present and identical
    bytes: int = 0  # bytes fetched
    runs: List[str] = field(default_factory=list)  # run dir names seen
    dests: List[str] = field(default_factory=list)  # <dest>/<group>, [<dest>/checkpoints/<group>]


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _load(group, spec_dir: Optional[str]) -> spec.GroupSpec:
    if isinstance(group, spec.GroupSpec):
        return group
    try:
        return spec.load_group(group, spec_dir)
    except spec.SpecError as e:
        if spec.NAME_RE.match(group) and not os.path.exists(group):
            where = os.path.join(spec_dir or spec.find_spec_dir(), group + ".yaml")
            if not os.path.exists(where):
                raise ValueError(f"unknown group {group!r}: no spec {where}") from None
        raise ValueError("; ".join(e.problems)) from None


def _patterns(runs_pattern: Optional[str]) -> List[str]:
    return [p.strip() for p in (runs_pattern or "").split(",") if p.strip()]


def check_credentials(buckets) -> None:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return  # emulators are anonymous
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:  # gcs.client() would fall back to anonymous and fail later with a less helpful 401
        google.auth.default()
    except DefaultCredentialsError as e:
        raise PermissionError(f"no Google credentials to read gs://{buckets[0]} ({_one_line(e)}): "
                              f"{AUTH_HINT}") from None


def _check_dest(path: str) -> None:
    """Refuse an unwritable destination without creating anything (mkdir/probe come later)."""
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PermissionError(f"cannot write to {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {path}: {probe} is not writable")


def _probe_dest(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to {path}: {e.strerror or e}") from None


def _list(url: str, patterns: List[str], with_checkpoints: bool, local_root: str):
    """[(blob, local path)] under url, filtered; refuses names that would escape local_root."""
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import RefreshError

    bucket, prefix = gcs.split_gcs(url)
    base = prefix + "/" if prefix else ""
    try:
        blobs = list(gcs.client().list_blobs(bucket, prefix=base))
    except (gexc.Unauthorized, gexc.Forbidden, RefreshError) as e:
        raise PermissionError(f"not allowed to list gs://{bucket} ({type(e).__name__}): {AUTH_HINT}, "
                              f"with an account that can read the bucket") from None
    except gexc.NotFound:
        raise FileNotFoundError(f"no bucket gs://{bucket} (from {url})") from None
    root = os.path.abspath(local_root)
    out = []
    for blob in blobs:
        rel = blob.name[len(base):]
        if not rel or rel.endswith("/"):
            continue  # "folder" placeholders
        parts = rel.split("/")
        if patterns and not any(fnmatch.fnmatchcase(parts[0], p) for p in patterns):
            continue
        if not with_checkpoints and len(parts) > 2 and parts[1] == "checkpoints":
            continue
        out.append((blob, local_path(root, rel, url)))
    return out


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def is_up_to_date(blob, local: str) -> bool:
    """True if ``local`` holds the blob's bytes: same size, then crc32c, else md5, else size alone."""
    try:
        if not os.path.isfile(local) or os.path.getsize(local) != (blob.size or 0):
            return False
    except OSError:
        return False
    if blob.crc32c:
        import google_crc32c

        h, want = google_crc32c.Checksum(), blob.crc32c
    elif blob.md5_hash:
        h, want = hashlib.md5(), blob.md5_hash
    else:
        return True  # the store gave no hash (composite objects have no md5): size must do
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return _b64(h.digest()) == want


def _chunks(jobs):
    chunk, size = [], 0
    for job in jobs:
        chunk.append(job)
        size += job[0].size or 0
        if len(chunk) >= CHUNK_FILES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _fetch(jobs, progress: bool) -> None:
    from google.cloud.storage import transfer_manager
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    console = Console(file=sys.stderr)
    bar = Progress(TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=console, disable=not (progress and console.is_terminal))
    with bar:
        task = bar.add_task("download", total=sum(b.size or 0 for b, _ in jobs))
        for chunk in _chunks(jobs):
            pairs = []
            for blob, local in chunk:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                tmp = os.path.join(os.path.dirname(local),
                                   f".{os.path.basename(local)[:100]}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
                # A fresh blob, not the listed one: that pins the listed generation, and a record
                # being rewritten by a live run (status.json) would then 404.
                pairs.append((blob.bucket.blob(blob.name), tmp))
            try:
                transfer_manager.download_many(pairs, worker_type=transfer_manager.THREAD, max_workers=WORKERS,
                                               raise_exception=True)
                for (_, local), (_, tmp) in zip(chunk, pairs):
                    os.replace(tmp, local)  # only a complete, verified file gets the real name
            except BaseException:
                for _, tmp in pairs:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                raise
            bar.advance(task, sum(b.size or 0 for b, _ in chunk))


def _remove_stale_partials(dirs) -> None:
    # Temp files of a killed earlier download are never a result. (Two downloads into one dest at
    # the same time would delete each other's: don't.)
    for d in dirs:
        for name in os.listdir(d):
            if _PARTIAL_RE.match(name):
                os.remove(os.path.join(d, name))


def download(group, dest: str = "results", with_checkpoints: bool = False, runs_pattern: Optional[str] = None,
             output_root: Optional[str] = None, progress: bool = True, spec_dir: Optional[str] = None) -> Summary:
    """Download ``group``'s run records to ``<dest>/<group>/`` (see the module docstring)."""
    g = _load(group, spec_dir)
    root = (output_root or g.output_root or "runs").rstrip("/")
    if not gcs.is_gcs(root):
        raise ValueError(f"the run records of {g.id} are local at {os.path.abspath(os.path.join(root, g.id))} "
                         f"and need no download")
    patterns = _patterns(runs_pattern)
    sources = [(f"{root}/{g.id}", os.path.join(dest, g.id))]
    if with_checkpoints and g.storage_root and gcs.is_gcs(g.storage_root):
        sources.append((f"{g.storage_root.rstrip('/')}/checkpoints/{g.id}", os.path.join(dest, "checkpoints", g.id)))
    check_credentials([gcs.split_gcs(url)[0] for url, _ in sources])
    for _, local in sources:
        _check_dest(os.path.abspath(local))
    jobs, runs = [], set()
    for i, (url, local) in enumerate(sources):
        found = _list(url, patterns, with_checkpoints, local)
        if i == 0 and not found:
            what = f" matching --runs {runs_pattern}" if patterns else ""
            raise FileNotFoundError(f"no run records{what} under {url}/ (nothing to download)")
        jobs += found
        runs.update(os.path.relpath(p, os.path.abspath(local)).split(os.sep)[0] for _, p in found)
    for _, local in sources:
        _probe_dest(os.path.abspath(local))
    todo = [job for job in jobs if not is_up_to_date(*job)]
    _fetch(todo, progress)
    _remove_stale_partials({os.path.dirname(p) for _, p in jobs})
    return Summary(downloaded=len(todo), skipped=len(jobs) - len(todo), bytes=sum(b.size or 0 for b, _ in todo),
                   runs=sorted(runs), dests=[local for _, local in sources])


def equivalent_commands(group, dest: str = "results", with_checkpoints: bool = False,
                        output_root: Optional[str] = None, spec_dir: Optional[str] = None) -> List[str]:
    """gsutil and gcloud commands that fetch the same files (for reference, and for the guide)."""
    g = _load(group, spec_dir)
    src = f"{(output_root or g.output_root or 'runs').rstrip('/')}/{g.id}"
    q, d = shlex.quote, dest.rstrip("/") or "."
    if not with_checkpoints:  # cp -r cannot leave out <run>/checkpoints/; rsync -x can
        x = q(_EXCLUDE_RE)
        return [f"gsutil -m rsync -r -x {x} {q(src)} {q(d + '/' + g.id)}",
                f"gcloud storage rsync -r -x {x} {q(src)} {q(d + '/' + g.id)}"]
    out = [f"gsutil -m cp -r {q(src)} {q(d + '/')}", f"gcloud storage cp -r {q(src)} {q(d + '/')}"]
    if g.storage_root and gcs.is_gcs(g.storage_root):
        ck = f"{g.storage_root.rstrip('/')}/checkpoints/{g.id}"
        out += [f"mkdir -p {q(d + '/checkpoints')}", f"gsutil -m cp -r {q(ck)} {q(d + '/checkpoints/')}",
                f"gcloud storage cp -r {q(ck)} {q(d + '/checkpoints/')}"]
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`kellen results download ...`"""
    p = subparsers.add_parser("results", help="fetch run records from gs://", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="results_command", required=True)
    d = sub.add_parser("download", help="copy a group's run records (and checkpoints) to local disk",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("group", metavar="GROUP", help="experiment group id (or spec path)")
    d.add_argument("--dest", default="results", metavar="DIR", help="local folder (default: results)")
    d.add_argument("--with-checkpoints", action="store_true",
                   help="also fetch <run>/checkpoints/ and <storage_root>/checkpoints/<group>/")
    d.add_argument("--runs", metavar="PATTERN", help="only run dirs matching these globs (comma-separated)")
    d.add_argument("--output-root", metavar="ROOT", help="where the records are (default: the spec's)")
    d.add_argument("--spec-dir", metavar="DIR", help="spec folder (default: configs/experiments)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=run_args)
    return p


def run_args(args) -> int:
    try:
        s = download(args.group, dest=args.dest, with_checkpoints=args.with_checkpoints, runs_pattern=args.runs,
                     output_root=args.output_root, progress=not args.no_progress, spec_dir=args.spec_dir)
        cmds = equivalent_commands(args.group, args.dest, args.with_checkpoints, args.output_root, args.spec_dir)
    except (ValueError, OSError) as e:  # OSError covers PermissionError, FileNotFoundError
        print(f"kellen results download: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kellen results download: interrupted; run it again to fetch the rest", file=sys.stderr)
        return 130
    where = " and ".join(d.rstrip("/") + "/" for d in s.dests)
    print(f"downloaded {s.downloaded} files ({s.bytes / 1e6:.1f} MB), skipped {s.skipped} up to date, "
          f"{len(s.runs)} runs, to {where}")
    print("equivalent:\n" + "\n".join("  " + c for c in cmds))
    return 0
